"""Zero-shot head: a prompt ensemble (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", section 3.1.4).

For class c: w_c = normalize(mean_t normalize(text_encoder(template_t(c)))).
Logits = exp(logit_scale) * <normalize(f(x)), w_c>, with the model's own learned scale.
The class embeddings are cached on disk keyed by weights hash + class names + templates, because
encoding 1000 classes x 80 templates takes ~95 min for ViT-B-32 on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from open_clip import build_zero_shot_classifier

from robench.io import write_npy
from robench.models.backbone import Backbone
from robench.models.heads import LinearHead


def text_key(backbone: Backbone, classnames: list[str], templates: list[str]) -> str:
    ident = json.dumps([backbone.weights_hash, backbone.precision, classnames, templates])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def class_embeddings(backbone: Backbone, classnames: list[str], templates: list[str],
                     cache_dir: str | Path, progress: bool = True) -> np.ndarray:
    """(D, C) float32 matrix of normalised class embeddings, from the cache when present."""
    key = text_key(backbone, classnames, templates)
    path = Path(cache_dir).expanduser() / "text" / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    with torch.no_grad(), backbone.autocast():
        w = build_zero_shot_classifier(
            backbone.model, tokenizer=backbone.tokenizer, classnames=classnames,
            templates=templates, num_classes_per_batch=10, device=backbone.device,
            use_tqdm=progress,
        )
    w = w.float().cpu().numpy()
    write_npy(path, w)
    return w


def zeroshot_head(backbone: Backbone, classnames: list[str], templates: list[str],
                  template_set: str, cache_dir: str | Path, progress: bool = True) -> LinearHead:
    """The zero-shot classifier for a label space."""
    w = class_embeddings(backbone, classnames, templates, cache_dir, progress)
    return LinearHead(weight=w, scale=backbone.logit_scale, classnames=list(classnames),
                      info={"head": "zeroshot", "template_set": template_set,
                            "n_templates": len(templates), "logit_scale": backbone.logit_scale})


def build(ctx, source) -> LinearHead:  # noqa: ANN001 - see runner.MethodContext
    """Method entry point used by the runner."""
    return zeroshot_head(ctx.backbone, source.classnames, ctx.templates(source),
                         ctx.template_set(source), ctx.cache_dir, ctx.progress)
