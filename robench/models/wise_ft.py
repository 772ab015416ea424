"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): weight-space
ensembling of the zero-shot and the fine-tuned model, head included,

    theta_alpha = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned,
    W_alpha     = (1 - alpha) * W_zeroshot     + alpha * W_finetuned.

alpha = 0 is the zero-shot model and alpha = 1 the fine-tuned one, exactly. ``options.alphas``
expands one declaration into one leaderboard model per alpha (``<name>-a<alpha>``); the
options are declared in :mod:`robench.methods.wise_ft`.

The head mix follows the fine-tuned head (:class:`robench.models.finetune.SavedHead`):

- fine-tuning / CAR-FT (W_ft at the frozen logit scale s): W_alpha as above, scored at s;
- LP-FT (a head with its own scale s_ft, 1, and a bias b): the mix of the two heads as linear
  layers on normalised features, as WiSE-FT's code mixes its classification heads (the
  zero-shot one is the layer s * W_zs with no bias):
  W_alpha = (1 - alpha) s W_zs + alpha s_ft W_ft, b_alpha = alpha s_ft b, scored at scale 1
  (at alpha 0 and 1 the end heads themselves, so the endpoints stay exact);
- FLYP (both towers trained, head = prompt ensemble of the text tower): the interpolated
  weights include the text tower and the logit scale, and the mix's head is the prompt
  ensemble of ITS text tower, computed like a zero-shot head (a ``text`` head file).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from robench import distributed
from robench.artifacts import artifact_dir, ensure
from robench.errors import RobenchError
from robench.models.backbone import load_backbone, save_derived
from robench.models.finetune import SavedHead, read_head, save_head
from robench.models.weights import derived_info
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


def mix_head(out: Path, ft: SavedHead, w_zs: np.ndarray | None, scale_zs: float,
             alpha: float) -> None:
    """Write the head of the mix (see the module docstring) into ``out``."""
    if ft.kind == "text":
        save_head(out, None, ft.classnames, kind="text")
    elif ft.bias is None and ft.scale is None:  # both heads at the frozen logit scale
        save_head(out, ((1 - alpha) * w_zs + alpha * ft.weight).astype(np.float32),
                  ft.classnames)
    elif alpha == 0:
        save_head(out, w_zs, ft.classnames)
    elif alpha == 1:
        save_head(out, ft.weight, ft.classnames, bias=ft.bias, scale=ft.scale)
    else:  # as linear layers on normalised features: weight s W, bias s b
        s_ft = scale_zs if ft.scale is None else ft.scale
        b_ft = np.zeros(ft.weight.shape[1]) if ft.bias is None else ft.bias.astype(np.float64)
        weight = (1 - alpha) * scale_zs * w_zs.astype(np.float64) + \
            alpha * s_ft * ft.weight.astype(np.float64)
        save_head(out, weight.astype(np.float32), ft.classnames,
                  bias=(alpha * s_ft * b_ft).astype(np.float32), scale=1.0)


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
    head_ft = read_head(ft_spec.pretrained)
    train_on = bench.method_of(ft_name).options.train_on
    w_zs = None if head_ft.kind == "text" else class_embeddings(
        zs, head_ft.classnames, bench.templates_for(train_on), cfg.cache_dir, progress=False)
    ident = {"zs": zs.weights_hash, "ft": ft.weights_hash, "alpha": alpha, "format": 2}
    out = artifact_dir(cfg.cache_dir, "wise-ft", ident) / "model"

    def mix() -> None:
        save_derived(zs, interpolate(zs.model.state_dict(), ft.model.state_dict(), alpha), out,
                     train_world_size=derived_info(ft_spec.pretrained).get("train_world_size", 1))
        mix_head(out, head_ft, w_zs, zs.logit_scale, alpha)

    world = distributed.current()
    if world.is_lead:  # one rank writes the shared folder
        ensure(out, mix, f"WiSE-FT alpha={alpha:g} of {ft_name}")
    world.barrier()
    return replace(spec, arch=declared.arch, pretrained=f"local-dir:{out}")
