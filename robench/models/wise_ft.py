"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): weight-space
ensembling of the zero-shot and the fine-tuned model, head included,

    theta_alpha = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned,
    W_alpha     = (1 - alpha) * W_zeroshot     + alpha * W_finetuned.

alpha = 0 is the zero-shot model and alpha = 1 the fine-tuned one, exactly. ``options.alphas``
expands one declaration into one leaderboard model per alpha (``<name>-a<alpha>``); the
options are declared in :mod:`robench.methods.wise_ft`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from robench import distributed
from robench.artifacts import artifact_dir, ensure
from robench.errors import RobenchError
from robench.models.backbone import load_backbone, save_derived
from robench.models.finetune import HEAD_FILE, load_head, save_head
from robench.models.zeroshot import class_embeddings
from robench.registry import ModelSpec

if TYPE_CHECKING:
    from robench.methods.base import Bench


def interpolate(zs: dict[str, torch.Tensor], ft: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zs + alpha * ft for floating tensors; others (e.g. int buffers) from zs."""
    if zs.keys() != ft.keys():
        raise RobenchError("zero-shot and fine-tuned checkpoints have different parameters",
                           "interpolate checkpoints of the same architecture")
    return {k: ((1 - alpha) * v + alpha * ft[k]) if v.is_floating_point() else v
            for k, v in zs.items()}


def prepare_mix(bench: Bench, spec: ModelSpec, ft_name: str, alpha: float) -> ModelSpec:
    """Mix the zero-shot and fine-tuned weights and heads; save the result as a ``local-dir:``
    folder with the zero-shot parent's architecture config and preprocessing."""
    ft_spec = bench.prepared(ft_name)
    declared = bench.declared(ft_name)
    cfg = bench.settings
    zs = load_backbone(declared.arch, declared.pretrained, cfg.device, "fp32",
                       allow_download=cfg.allow_download, seed=cfg.seed)
    ft = load_backbone(declared.arch, ft_spec.pretrained, cfg.device, "fp32",
                       allow_download=cfg.allow_download, seed=cfg.seed)
    if ft.model_cfg != zs.model_cfg or ft.preprocess_cfg != zs.preprocess_cfg:
        raise RobenchError(f"wise-ft: {ft_name} is not a fine-tuned copy of {declared.arch} "
                           f"({declared.pretrained}): architecture or preprocessing differ",
                           "interpolate a model with the checkpoint it was fine-tuned from")
    w_ft, classnames = load_head(ft_spec.pretrained)
    train_on = bench.method_of(ft_name).options.train_on
    w_zs = class_embeddings(zs, classnames, bench.templates_for(train_on), cfg.cache_dir,
                            progress=False)
    ident = {"zs": zs.weights_hash, "ft": ft.weights_hash, "alpha": alpha, "format": 2}
    out = artifact_dir(cfg.cache_dir, "wise-ft", ident) / "model"

    def mix() -> None:
        save_derived(zs, interpolate(zs.model.state_dict(), ft.model.state_dict(), alpha), out)
        save_head(out, ((1 - alpha) * w_zs + alpha * w_ft).astype(np.float32), classnames)

    world = distributed.current()
    if world.is_lead:  # one rank writes the shared folder
        ensure(out, HEAD_FILE, mix, f"WiSE-FT alpha={alpha:g} of {ft_name}")
    world.barrier()
    return replace(spec, arch=declared.arch, pretrained=f"local-dir:{out}")
