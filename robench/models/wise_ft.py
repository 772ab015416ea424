"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): weight-space
ensembling of the zero-shot and the fine-tuned model, head included,

    theta_alpha = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned,
    W_alpha     = (1 - alpha) * W_zeroshot     + alpha * W_finetuned.

alpha = 0 is the zero-shot model and alpha = 1 the fine-tuned one, exactly. ``options.alphas``
expands one declaration into one leaderboard model per alpha (``<name>-a<alpha>``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from robench.artifacts import artifact_dir
from robench.errors import RobenchError
from robench.io import atomic_write, write_npy
from robench.models.backbone import load_backbone
from robench.models.finetune import finetuned_head
from robench.models.heads import LinearHead
from robench.models.zeroshot import class_embeddings
from robench.registry import ModelSpec


def expand(name: str, spec: ModelSpec) -> list[tuple[str, ModelSpec]]:
    """One model per alpha of ``options.alphas`` (or the single ``options.alpha``)."""
    opts = dict(spec.options)
    if "finetuned" not in opts:
        raise RobenchError(f"wise-ft model '{name}' needs options.finetuned",
                           "name the fine-tuned model (finetune or car-ft) to interpolate with")
    alphas = opts.pop("alphas", None)
    if alphas is None:
        return [(name, spec)]
    return [(f"{name}-a{a:g}", replace(spec, options={**opts, "alpha": float(a)}))
            for a in alphas]


def interpolate(zs: dict[str, torch.Tensor], ft: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zs + alpha * ft for floating tensors; others (e.g. int buffers) from zs."""
    if zs.keys() != ft.keys():
        raise RobenchError("zero-shot and fine-tuned checkpoints have different parameters",
                           "interpolate checkpoints of the same architecture")
    return {k: ((1 - alpha) * v + alpha * ft[k]) if v.is_floating_point() else v
            for k, v in zs.items()}


def prepare(runner, name: str, spec: ModelSpec) -> ModelSpec:
    opts = spec.options
    alpha = float(opts.get("alpha", 0.5))
    if not 0.0 <= alpha <= 1.0:
        raise RobenchError(f"wise-ft alpha {alpha} outside [0, 1]", "use 0 <= alpha <= 1")
    ft_name = opts["finetuned"]
    ft_spec = runner.prepared(ft_name)
    declared = runner.declared(ft_name)
    cfg = runner.cfg
    zs = load_backbone(declared.arch, declared.pretrained, cfg.device, "fp32",
                       allow_download=cfg.allow_download, seed=cfg.seed)
    ft_state = torch.load(ft_spec.pretrained, map_location=zs.device, weights_only=True)
    train_on = ft_spec.options["train_on"]
    classnames = ft_spec.options["_classnames"]
    w_zs = class_embeddings(zs, classnames, runner.templates_for(train_on), cfg.cache_dir,
                            progress=False)
    w_ft = np.load(ft_spec.options["_head"])
    ident = {"zs": zs.weights_hash, "ft": ft_spec.pretrained, "alpha": alpha}
    out = artifact_dir(cfg.cache_dir, "wise-ft", ident)
    ckpt, head = out / "model.pt", out / "head.npy"
    if not (ckpt.is_file() and head.is_file()):
        mixed = interpolate(zs.model.state_dict(), ft_state, alpha)
        write_npy(head, ((1 - alpha) * w_zs + alpha * w_ft).astype(np.float32))
        atomic_write(ckpt, lambda tmp: torch.save(mixed, tmp))
    return replace(spec, arch=declared.arch, pretrained=str(ckpt),
                   options={**opts, "train_on": train_on, "_head": str(head),
                            "_classnames": classnames})


def build(ctx, source) -> LinearHead:
    head = finetuned_head(ctx, source)
    head.info.update({"alpha": ctx.spec.options["alpha"],
                      "finetuned": ctx.spec.options["finetuned"]})
    return head
