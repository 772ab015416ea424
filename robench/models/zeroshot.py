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

from robench.io import CorruptEntry, discard, load_npy, write_npy
from robench.models.backbone import Backbone
from robench.models.heads import LinearHead
from robench.progress import progress_bar

CLASSES_PER_BATCH = 10  # classes per text-encoder forward (x templates prompts)


def text_key(backbone: Backbone, classnames: list[str], templates: list[str]) -> str:
    ident = json.dumps([backbone.weights_hash, backbone.precision, classnames, templates])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def class_embeddings(backbone: Backbone, classnames: list[str], templates: list[str],
                     cache_dir: str | Path, progress: bool = True) -> np.ndarray:
    """(D, C) float32 matrix of normalised class embeddings, from the cache when present."""
    key = text_key(backbone, classnames, templates)
    path = Path(cache_dir).expanduser() / "text" / f"{key}.npy"
    if path.is_file():
        try:
            return load_npy(path)
        except CorruptEntry as e:
            discard(path, reason=f"text head: {e.problem}")
    # open_clip encodes classes in batches of 10; calling it on whole multiples of 10 classes
    # (~10 calls) runs exactly the same batches, so the result is bit-identical to one call,
    # and the progress shows as robench's own bar or log lines
    per_call = CLASSES_PER_BATCH * max(1, -(-len(classnames) // (10 * CLASSES_PER_BATCH)))
    bar = progress_bar(total=len(classnames), unit="class", disable=not progress, leave=False,
                       desc=f"text head ({len(templates)} templates)")
    blocks = []
    with torch.no_grad(), backbone.autocast():
        for s in range(0, len(classnames), per_call):
            blocks.append(build_zero_shot_classifier(
                backbone.model, tokenizer=backbone.tokenizer,
                classnames=classnames[s:s + per_call], templates=templates,
                num_classes_per_batch=CLASSES_PER_BATCH, device=backbone.device, use_tqdm=False,
            ).float().cpu())
            bar.update(len(blocks[-1].T))
    bar.close()
    w = torch.cat(blocks, dim=1).numpy()
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
