"""LP-FT (Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features
and Underperform Out-of-Distribution", ICLR 2022): linear probing, then full fine-tuning.

1. **LP**: the linear probe of :mod:`robench.models.linear_probe` on the frozen image features
   of ``train_on`` (its C chosen on ``val_on``, refit as its ``refit`` option says). It is the
   very artifact a ``linear-probe`` model with the same options builds (same key: backbone,
   feature keys, probe options, seed), so a suite holding both fits it once:
   logits_LP(x) = 1 * (<normalize(f_theta0(x)), W_LP> + b_LP).
2. **FT**: end-to-end fine-tuning of the image tower with cross-entropy through the loop of
   :mod:`robench.models.finetune` (AdamW, warm-up + cosine, DDP, micro-batches, AMP,
   checkpoints and resume), the head initialised with the probe's weight AND bias at the
   probe's scale (1, not the logit scale) and trained with the encoder:
   logits(x) = 1 * (<normalize(f_theta(x)), W> + b),  (theta, W, b) init (theta0, W_LP, b_LP).

The paper's point is the initialisation: a head that already fits the features means small
gradients into the encoder at the start of fine-tuning, so the features are distorted less (and
the fine-tuning stage is run with a smaller lr than plain fine-tuning).

At zero steps the checkpoint is the pre-trained encoder bit for bit and the head is the probe's
float32 arrays, so the image features, and hence the logits of every cell, are the linear
probe's EXACTLY (same network, same kernels, same arithmetic), not merely to float32 rounding:
always with ``epochs: 0``; with ``lr: 0`` (AdamW multiplies each weight by 1 - 0 * wd = 1 and
adds 0 times a finite step) for image towers without BatchNorm (ViTs), since a BatchNorm tower
(ModifiedResNet, the quickstart's tiny CLIP) re-estimates its running statistics on the
training views in training mode, whatever the lr.

The probe is fitted on features of the fp32 backbone, the network that is then fine-tuned; it
is shared with a ``linear-probe`` model of a suite run at ``model.precision: fp32`` (the
default), while at fp16/bf16 the linear-probe model's features (and so its probe) differ.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from robench import distributed
from robench.artifacts import artifact_dir
from robench.errors import RobenchError
from robench.methods.base import HeadContext
from robench.models.backbone import load_backbone
from robench.models.finetune import HeadInit, finetune, train_once
from robench.models.heads import LinearHead
from robench.models.linear_probe import probe_head
from robench.registry import ModelSpec

if TYPE_CHECKING:
    from robench.methods.base import Bench
    from robench.methods.lp_ft import LPFTOptions

FORMAT = 1  # bump when the procedure changes, so stale checkpoints are not reused


def probe_stage(bench: Bench, spec: ModelSpec, base, opts: LPFTOptions) -> LinearHead:
    """The linear probe of the LP stage (trained, or the cached artifact). Under ``torchrun``
    the lead rank extracts the features and fits it; the other ranks then read both from the
    cache."""
    source = bench.source(opts.train_on)
    if list(bench.source(opts.val_on).classnames) != list(source.classnames):
        raise RobenchError(f"lp-ft: {opts.val_on} and {opts.train_on} have different label "
                           "spaces", "validate on a split of the same dataset")
    ctx = HeadContext(base, spec, bench)
    world = distributed.current()
    head = probe_head(ctx, source, opts.probe()) if world.is_lead else None
    world.barrier()
    return head if head is not None else probe_head(ctx, source, opts.probe())


def prepare_lp_ft(bench: Bench, name: str, spec: ModelSpec, opts: LPFTOptions) -> ModelSpec:
    """Fit (or reuse) the probe, then train (or reuse) the LP-FT checkpoint; return the spec
    that loads it (a ``local-dir:`` folder with the head, its bias and scale)."""
    cfg = bench.settings
    source = bench.source(opts.train_on)
    base = load_backbone(spec.arch, spec.pretrained, cfg.device, "fp32",
                         allow_download=cfg.allow_download, seed=cfg.seed)
    probe = probe_stage(bench, spec, base, opts)
    ident = {"weights": base.weights_hash, "train": source.manifest_hash,
             "probe": Path(probe.info["artifact"]).name, "opts": opts.identity(),
             "seed": cfg.seed, "method": spec.method, "arch": base.model_cfg,
             "format": FORMAT}
    out = artifact_dir(cfg.cache_dir, "lp-ft", ident)
    init = HeadInit(weight=probe.weight, bias=probe.bias, scale=probe.scale)
    ckpt = train_once(out, name, lambda: finetune(base, source, [], opts, out, cfg.cache_dir,
                                                  seed=cfg.seed, progress=cfg.progress,
                                                  init=init, label="lp-ft"))
    return replace(spec, pretrained=ckpt)
