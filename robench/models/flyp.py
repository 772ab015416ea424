"""FLYP (Goyal, Kumar, Garg, Kolter, Raghunathan, "Finetune like you pretrain: Improved
finetuning of zero-shot vision models", CVPR 2023): fine-tune a CLIP the way it was
pre-trained, then classify with it zero-shot.

Training. Each labelled image x_i gets a caption c_i = template_{t_i}(classname(y_i)) from the
training split's templates, and BOTH towers and the learned temperature are trained with CLIP's
symmetric contrastive loss over the batch of N pairs (Radford et al. 2021, figure 3):

    I = normalize(f(x)), T = normalize(g(c)), s = exp(logit_scale) (a parameter, as in
    pre-training; kept in [0, ln 100] after each step as open_clip's pre-training does),
    L = 1/2 [ CE(s I T^T, arange(N)) + CE(s T I^T, arange(N)) ].

- Template choice: t_i is drawn uniformly from the templates, independently per sample and per
  epoch, from ``(seed, epoch, i)`` (a numpy ``SeedSequence``), so it does not depend on worker
  or rank counts. FLYP's ImageNet data (``datacreation_scripts/imagenet_csv_creator.py``) lists
  every (image, template) pair and samples them shuffled: a uniform template per draw.
- Duplicates: as FLYP (``src/models/flyp_loss.py``: open_clip's ``ClipLoss``, labels
  ``arange(N)``), the positive of image i is its own caption only; other samples' captions are
  negatives even when they name the same class (identical text when the template matches too).
  No de-duplication and no multi-positive targets.
- Nothing is frozen: every parameter of the CLIP (image and text towers, token and positional
  embeddings, projections, logit scale) is trained, all with the same AdamW weight decay as in
  FLYP's code. Schedule, AMP, checkpoints and resume are those of
  :mod:`robench.models.finetune` (warm-up + cosine; a checkpoint per epoch and every
  ``checkpoint_every`` steps; resumed to the same weights as an uninterrupted run).
- Scale (``torchrun``): ``batch_size`` is the GLOBAL batch and the loss is the global batch's.
  Each rank encodes its contiguous part of the global batch (:func:`robench.models.finetune.
  rank_steps`), the normalised features of all ranks are gathered WITH gradient
  (``torch.distributed.nn.functional.all_gather``, whose backward sums every rank's gradient
  into the owner's slice: open_clip's ``gather_with_grad``), and rank r back-propagates the sum
  of its own rows' losses l_i = 1/2 [CE(s I_i T_all^T, i) + CE(s T_i I_all^T, i)] divided by N.
  The ranks' gradients are then SUMMED (the fine-tuning loop's DDP hook), which gives exactly the
  gradient of L over the global batch; on CPU, 1 or N ranks give the same weights up to float
  summation order. A rank with no sample in a short last batch runs a zero-weight placeholder.
  Micro-batching (gradient accumulation) is not offered: it would split the negatives.

Evaluation: the model is a CLIP again, so its head is the prompt ensemble of the FINE-TUNED text
tower (:func:`robench.models.zeroshot.zeroshot_head`) over the scored dataset's classes and
templates, at the fine-tuned ``exp(logit_scale)``, for any label space. Its per-class text cache
is keyed on the weights hash, so the fine-tuned model gets a store of its own; at lr 0 the
weights, hence the store, the head and every logit, are the zero-shot model's exactly. The
checkpoint's ``robench_head.npz`` is a ``text`` head (no weight): WiSE-FT mixes both towers and
the scale, and the mix's head is the prompt ensemble of its own text tower.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from robench import distributed
from robench.artifacts import artifact_dir, binding, intact, seal_artifact
from robench.errors import RobenchError
from robench.io import atomic_write, discard, seal_file
from robench.models.backbone import Backbone, load_backbone, save_derived
from robench.models.finetune import (
    CHECKPOINT,
    PRECISIONS,
    _Labelled,
    data_parallel,
    epoch_order,
    load_resume,
    rank_steps,
    save_head,
    schedule,
    train_once,
    train_transform,
)
from robench.progress import progress_bar as tqdm
from robench.registry import ModelSpec

if TYPE_CHECKING:
    from robench.methods.base import Bench
    from robench.methods.flyp import FLYPOptions

FORMAT = 1  # bump when the procedure changes, so stale checkpoints are not reused
MAX_LOG_SCALE = math.log(100.0)  # CLIP's clip of the temperature (open_clip: clamp_(0, ln 100))


def template_index(seed: int, epoch: int, index: int, n_templates: int) -> int:
    """The template of sample ``index`` in ``epoch``: uniform over ``n_templates``, from
    ``SeedSequence([seed, epoch, index])``."""
    return int(np.random.default_rng([seed, epoch, index]).integers(n_templates))


class _Captioned(_Labelled):
    """(image, tokenised caption) of a sample: the fine-tuning augmentation, and its class name
    filled into the template :func:`template_index` picks."""

    def __init__(self, source, transform, seed: int, epoch: int, templates: list[str],
                 tokenizer) -> None:
        super().__init__(source, transform, seed, epoch)
        self.templates, self.tokenizer = templates, tokenizer

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        t = template_index(self.seed, self.epoch, i, len(self.templates))
        caption = self.templates[t].format(self.source.classnames[label])
        return image, self.tokenizer([caption])[0]


def contrastive_rows(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor,
                     all_text: torch.Tensor, scale: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """Per-row CLIP losses of the rows ``image``, ``text`` (normalised) of a batch whose
    normalised features are ``all_image``, ``all_text``: row i's positive is column
    ``labels[i]``, l_i = 1/2 [CE(s I_i T_all^T, labels_i) + CE(s T_i I_all^T, labels_i)]."""
    per_image = F.cross_entropy(scale * image @ all_text.T, labels, reduction="none")
    per_text = F.cross_entropy(scale * text @ all_image.T, labels, reduction="none")
    return (per_image + per_text) / 2


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of one batch of pairs (normalised features): the mean of
    :func:`contrastive_rows` over the batch, each row's positive its own pair."""
    labels = torch.arange(len(image), device=image.device)
    return contrastive_rows(image, text, image, text, scale, labels).mean()


def part_sizes(n: int, size: int) -> list[int]:
    """Samples of each rank in a global batch of ``n`` (``rank_steps``' contiguous split)."""
    return [(r + 1) * n // size - r * n // size for r in range(size)]


def gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The rows of every rank in rank order (rank r's first ``sizes[r]``; a placeholder row
    beyond them is dropped), gathered WITH gradient: ``all_gather`` needs equal shapes, so each
    rank pads to the widest part with zeros (constants: no gradient)."""
    import torch.distributed.nn  # noqa: F401 - registers torch.distributed.nn.functional

    widest = max(max(sizes), len(local))
    padded = torch.cat([local, local.new_zeros(widest - len(local), local.shape[1])]) \
        if len(local) < widest else local
    with warnings.catch_warnings():  # open_clip's gather_with_grad uses the same function
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated",
                                category=FutureWarning)
        parts = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])


def rank_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, sizes: list[int],
              rank: int, global_size: int) -> torch.Tensor:
    """This rank's share of the global batch's CLIP loss: the sum of its real rows' losses
    (the first ``sizes[rank]`` of ``image`` / ``text``) against the gathered global batch,
    divided by ``global_size``; summed over the ranks it is :func:`clip_loss` of the global
    batch, value and gradient. One rank (``len(sizes) == 1``) needs no gather."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    scale = scale.float()
    if len(sizes) > 1:
        all_image, all_text = gather_rows(image, sizes), gather_rows(text, sizes)
    else:
        all_image, all_text = image, text
    mine = sizes[rank]
    offset = sum(sizes[:rank])
    labels = torch.arange(len(image), device=image.device) + offset
    weight = (torch.arange(len(image), device=image.device) < mine).float()
    labels = labels * weight.long()  # a placeholder row points at column 0, at weight 0
    rows = contrastive_rows(image, text, all_image, all_text, scale, labels)
    return (rows * weight).sum() / global_size


class _Towers(torch.nn.Module):
    """The whole CLIP as one module for DistributedDataParallel: (image features, text
    features, exp(logit_scale))."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.model.encode_image(images), self.model.encode_text(tokens),
                self.model.logit_scale.exp())


def flyp_finetune(backbone: Backbone, source, templates: list[str], opts: FLYPOptions,
                  out: Path, seed: int = 0, progress: bool = True) -> str:
    """Fine-tune both towers of ``backbone`` on ``source`` with the CLIP loss; returns the
    ``local-dir:`` spec of the result (an open_clip folder, :func:`save_derived`, plus a
    ``text`` head file). Under ``torchrun`` every rank calls this together."""
    world = distributed.current()
    final = out / "model"
    # only the lead (holding the artifact's lock) removes a damaged result
    if world.all_min(int(intact(final, repair=world.is_lead))):
        return f"local-dir:{final}"
    if opts.precision not in PRECISIONS:
        raise RobenchError(f"unknown fine-tuning precision '{opts.precision}'",
                           "use options.precision: fp32, bf16 or fp16")
    if not templates:
        raise RobenchError(f"flyp: {source.name} has no prompt templates to caption its images",
                           "give the training dataset a template set")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model, device = backbone.model, backbone.device
    for p in model.parameters():  # both towers and the temperature: nothing frozen
        p.requires_grad_(True)
    params = list(model.parameters())
    towers = _Towers(model)
    net = data_parallel(towers, device, world)
    plan = schedule(params, opts, len(source), device)
    opt, sched, scaler, autocast = plan.opt, plan.sched, plan.scaler, plan.autocast
    bsz, steps_per_epoch, total = opts.batch_size, plan.steps_per_epoch, plan.total
    # the temperature's range: CLIP's [0, ln 100], widened to hold a pre-trained value outside
    # it, so a model is never changed by the clamp alone
    start = float(model.logit_scale.detach())
    low, high = min(0.0, start), max(MAX_LOG_SCALE, start)
    step = 0
    resume = out / CHECKPOINT
    if (state := load_resume(resume, device)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])

    def checkpoint() -> None:  # the lead writes it; every rank holds the same weights
        if world.is_lead:
            state = {"model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "scaler": scaler.state_dict(), "step": step}
            atomic_write(resume, lambda tmp: torch.save(state, tmp))
            seal_file(resume, bound=binding(resume))  # this run's state, no other's
        world.barrier()

    tf = train_transform(backbone)
    bar = tqdm(total=total, initial=step, unit="step", disable=not (progress and world.is_lead),
               desc=f"flyp {source.name}", leave=False)
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        model.train()
        steps = rank_steps(epoch_order(len(source), seed, epoch), bsz, world)[first:]
        loader = DataLoader(
            _Captioned(source, tf, seed, epoch, templates, backbone.tokenizer),
            batch_sampler=[m for _, micro in steps for m, _ in micro], num_workers=opts.workers)
        for (global_size, _), (x, tokens) in zip(steps, loader, strict=True):
            opt.zero_grad(set_to_none=True)
            with autocast():
                image, text, scale = net(x.to(device), tokens.to(device))
            loss = rank_loss(image, text, scale, part_sizes(global_size, world.size),
                             world.rank, global_size)
            scaler.scale(loss).backward()
            if opts.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(low, high)
            step += 1
            bar.set_postfix(loss=f"{loss.item() * global_size / max(1, len(x)):.3f}",
                            scale=f"{float(scale.detach()):.2f}")
            bar.update(1)
            every = opts.checkpoint_every
            if step % steps_per_epoch == 0 or (every and step % every == 0):
                checkpoint()
    bar.close()
    model.eval()
    if world.is_lead:
        save_derived(backbone, model.state_dict(), final, train_world_size=world.size)
        save_head(final, None, list(source.classnames), kind="text")
        seal_artifact(final)  # last: the folder is complete
        discard(resume)
    world.barrier()  # the result is on disk for every rank
    return f"local-dir:{final}"


def prepare_flyp(bench: Bench, name: str, spec: ModelSpec, opts: FLYPOptions) -> ModelSpec:
    """Train (or reuse) the FLYP checkpoint; return a spec that loads it."""
    cfg = bench.settings
    source = bench.source(opts.train_on)
    base = load_backbone(spec.arch, spec.pretrained, cfg.device, "fp32",
                         allow_download=cfg.allow_download, seed=cfg.seed)
    templates = bench.templates_for(opts.train_on)
    ident = {"weights": base.weights_hash, "train": source.manifest_hash,
             "opts": opts.identity(), "seed": cfg.seed, "templates": templates,
             "method": spec.method, "arch": base.model_cfg, "format": FORMAT}
    out = artifact_dir(cfg.cache_dir, "flyp", ident)
    ckpt = train_once(out, name, lambda: flyp_finetune(base, source, templates, opts, out,
                                                       seed=cfg.seed, progress=cfg.progress))
    return replace(spec, pretrained=ckpt)
