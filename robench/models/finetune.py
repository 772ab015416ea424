"""End-to-end fine-tuning of the image encoder: plain ``finetune`` and ``car-ft``.

Both train the image tower (text tower and logit scale frozen) with cross-entropy on labelled ID
data through a linear head initialised from the zero-shot weights of the training label space
(Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", WiSE-FT, section 2):

    logits(x) = s * <normalize(f_theta(x)), W>,   s = exp(logit_scale), W init = zero-shot weights.

CAR-FT (Mao et al., "Context-Aware Robust Fine-Tuning", arXiv 2211.16175, IJCV 2024) adds a
context regulariser that keeps the fine-tuned encoder's *context* distribution close to the
pre-trained one's:

    L = CE(logits(x), y) + lambda * KL(p_ctx(x; theta_0) || p_ctx(x; theta)),
    p_ctx(x; theta) = softmax_i(s * <normalize(f_theta(x)), v_i>),
    v_i = normalize(mean_c normalize(g(template_i(c)))),

with theta_0 the frozen pre-trained encoder and v_i one context vector per prompt template.
With lambda = 0 CAR-FT is plain fine-tuning, and at initialisation (theta = theta_0) its KL term
is 0. Defaults follow the WiSE-FT line: AdamW, lr 1e-5..3e-5 for real CLIPs (the tiny quickstart
model uses a larger one), weight decay 0.1, cosine schedule with warm-up, grad-clip 1.0.

Scale (``torchrun``, :mod:`robench.distributed`): ``batch_size`` is the GLOBAL batch, as in the
papers (512). Each epoch's sample order is one permutation drawn from ``(seed, epoch)``; every
global batch of it is split into contiguous per-rank parts (no padding, no duplicates), and a
rank's part into micro-batches of ``micro_batch`` (gradient accumulation; 0: the whole part in
one forward). Each rank back-propagates the SUM of its samples' losses divided by the global
batch size, and DistributedDataParallel all-reduces gradient SUMS (not means of rank-local
means, which would weight samples unequally when a batch does not split evenly), so the step is
the mean over the global batch whatever the number of ranks or micro-batches: on CPU the same
seed gives the same weights with 1 or N ranks, up to float summation order. The frozen
pre-trained encoder of CAR-FT is replicated on every rank. ``precision`` runs the forward under
autocast (``bf16``, or ``fp16`` with a GradScaler); weights and optimiser stay float32.

LP-FT (:mod:`robench.models.lp_ft`) runs this loop from a linear probe's head instead of the
zero-shot one (:class:`HeadInit`: weight, bias, scale 1): logits = s * (<normalize(f), W> + b).
FLYP (:mod:`robench.models.flyp`) reuses its sample order, rank split, schedule, checkpoints and
gradient-sum hook around a contrastive step over both towers.

Training checkpoints into the artifact folder after every epoch (and every
``checkpoint_every`` steps) and resumes from the last checkpoint, mid-epoch included, to the
same weights as an uninterrupted run; the final checkpoint (the whole CLIP state dict) is then
evaluated like any other backbone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from robench import distributed
from robench.artifacts import artifact_dir, binding, intact, seal_artifact
from robench.data.base import UndecodableImage, read_image
from robench.errors import RobenchError
from robench.features import describe
from robench.io import (
    CorruptEntry,
    atomic_write,
    discard,
    entry_lock,
    load_npz,
    seal_file,
    verify_file,
    write_npz,
)
from robench.models.backbone import Backbone, load_backbone, save_derived
from robench.models.heads import LinearHead
from robench.models.zeroshot import class_embeddings
from robench.progress import progress_bar as tqdm  # a bar on a TTY, lines in a log
from robench.registry import ModelSpec

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.methods.base import Bench, HeadContext
    from robench.methods.finetune import FineTuneOptions

# The options and their defaults: robench.methods.finetune.FineTuneOptions
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"


def _normalize_of(preprocess: object) -> T.Normalize:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    raise RobenchError("the backbone's preprocessing has no Normalize step",
                       "fine-tuning needs the tag's mean/std")


def train_transform(backbone: Backbone) -> T.Compose:
    """Random resized crop + flip at the model's resolution, then the tag's normalisation."""
    return T.Compose([T.RandomResizedCrop(backbone.image_size, scale=(0.6, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), _normalize_of(backbone.preprocess)])


class _Labelled(Dataset):
    def __init__(self, source, transform, seed: int, epoch: int) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        # per-(seed, epoch, image) randomness: identical augmentations whatever the worker count
        torch.manual_seed(hash((self.seed, self.epoch, i)) % (2**31))
        try:  # the guarded decode path of every run (bombs, 16-bit, transparency)
            image = read_image(self.source, i)
        except UndecodableImage as e:  # a training set cannot skip a row: its batches are fixed
            raise RobenchError(f"{self.source.name}: training image {describe(self.source, [i])}"
                               f" cannot be decoded ({e})", "remove or replace it in the "
                               "training split (robench data verify names every such file)"
                               ) from e
        return self.transform(image), int(self.source.labels[i])


def context_weights(backbone: Backbone, classnames: list[str], templates: list[str],
                    cache_dir: str | Path) -> torch.Tensor:
    """(D, M) context vectors v_i = normalize(mean_c normalize(g(template_i(c))))."""
    cols = [class_embeddings(backbone, classnames, [t], cache_dir, progress=False).mean(axis=1)
            for t in templates]
    v = torch.tensor(np.stack(cols, axis=1))
    return F.normalize(v, dim=0)


def car_ft_loss(logits: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor,
                feats0: torch.Tensor, ctx: torch.Tensor, scale: float, lam: float,
                label_smoothing: float = 0.0, reduction: str = "mean"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """CE + lambda * KL(p_ctx(theta_0) || p_ctx(theta)); returns (total, kl), each the mean
    over the batch (``reduction="mean"``) or the sum over its samples (``"sum"``)."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing,
                         reduction=reduction)
    if lam == 0:
        return ce, torch.zeros((), device=logits.device)
    logp = F.log_softmax(scale * F.normalize(feats.float(), dim=-1) @ ctx, dim=-1)
    logp0 = F.log_softmax(scale * F.normalize(feats0.float(), dim=-1) @ ctx, dim=-1)
    kl = F.kl_div(logp, logp0, log_target=True,
                  reduction="batchmean" if reduction == "mean" else "sum")
    return ce + lam * kl, kl


@dataclass(frozen=True)
class HeadInit:
    """The head fine-tuning starts from, when it is not the zero-shot one: ``weight`` (D, C),
    an optional ``bias`` (C,) and the fixed ``scale`` of its logits (LP-FT: a linear probe's,
    scale 1 and a bias)."""

    weight: np.ndarray
    bias: np.ndarray | None
    scale: float


class _Tuned(torch.nn.Module):
    """What fine-tuning trains, as one module for DistributedDataParallel: the image tower and
    the linear head, logits = s * <normalize(f(x)), W> (fine-tuning, CAR-FT), or
    s * (<normalize(f(x)), W> + b) when the head has a bias (LP-FT: s = 1)."""

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.visual, self.scale = visual, scale
        self.head = torch.nn.Parameter(head)
        self.bias = None if bias is None else torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.visual(x)
        if self.bias is None:  # this exact expression: plain fine-tuning's numbers stay put
            return feats, self.scale * F.normalize(feats, dim=-1) @ self.head
        # the order of robench.models.heads.LinearHead.logits: (f W + b) * s
        return feats, (F.normalize(feats, dim=-1) @ self.head + self.bias) * self.scale


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's global sample order: the permutation ``DataLoader(shuffle=True,
    generator=Generator().manual_seed(seed * 1000 + epoch))`` draws (one int64 for its worker
    base seed, then ``randperm``), so one process trains on the order it always has."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g).tolist()


def rank_steps(order: list[int], batch_size: int, world: distributed.World,
               micro_batch: int = 0) -> list[tuple[int, list[tuple[list[int], bool]]]]:
    """Per global step, (global batch size, this rank's micro-batches as (sample indices,
    real?)).

    A global batch (``batch_size`` consecutive entries of ``order``) is split into contiguous
    per-rank parts whose sizes differ by at most one, each part into micro-batches of at most
    ``micro_batch`` samples (0: one micro-batch). Every rank gets the same number of
    micro-batches per step, as DistributedDataParallel's collectives need; a rank left with
    nothing for one (a last batch smaller than the world) gets a placeholder sample, flagged
    not real, whose loss is multiplied by 0.
    """
    r, w = world.rank, world.size
    steps = []
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        part = batch[r * len(batch) // w:(r + 1) * len(batch) // w]
        widest = math.ceil(len(batch) / w)
        size = micro_batch if micro_batch > 0 else widest
        count = math.ceil(widest / size)
        micro = [part[i * size:(i + 1) * size] for i in range(count)]
        steps.append((len(batch), [(m, True) if m else (batch[:1], False) for m in micro]))
    return steps


def _sum_gradients(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the real annotations
    """DDP communication hook: all-reduce gradient SUMS (DDP's default divides by the world
    size; here each rank's loss is already divided by the global batch size)."""
    fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


HEAD_FILE = "robench_head.npz"


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine
    to 0 at ``total`` (the WiSE-FT / open_clip schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class Schedule:
    """The optimisation every fine-tuning method shares: AdamW over ``params``, a per-step
    linear warm-up then cosine to 0 (:func:`warmup_cosine`), the autocast of ``precision`` and
    the gradient scaler (active for fp16 only)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    steps_per_epoch: int
    total: int


def schedule(params: list[torch.nn.Parameter], opts: object, n_samples: int,
             device: str) -> Schedule:
    """:class:`Schedule` of ``opts`` (``lr``, ``weight_decay``, ``batch_size``, ``epochs``,
    ``warmup``, ``precision``: the fields finetune's, LP-FT's and FLYP's options share) for an
    epoch of ``n_samples`` at the global batch size."""
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(n_samples / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, opts.warmup, total))
    dev_type = device.split(":")[0]
    amp = PRECISIONS[opts.precision]
    autocast = (lambda: torch.autocast(dev_type, dtype=amp)) if amp is not None \
        else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dev_type, enabled=opts.precision == "fp16")
    return Schedule(opt, sched, scaler, autocast, steps_per_epoch, total)


def data_parallel(module: torch.nn.Module, device: str,
                  world: distributed.World) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun (gradients summed, then divided by
    the global batch in the loss: :func:`_sum_gradients`), itself otherwise."""
    if not world.distributed:
        return module
    net = torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    net.register_comm_hook(None, _sum_gradients)
    return net


def finetune(backbone: Backbone, source, templates: list[str], opts: FineTuneOptions, out: Path,
             cache_dir: str | Path, seed: int = 0, progress: bool = True,
             init: HeadInit | None = None, label: str | None = None) -> str:
    """Fine-tune ``backbone`` on ``source``; returns the ``local-dir:`` spec of the result.

    The head starts from the zero-shot weights of ``templates`` at the logit scale, or from
    ``init`` (LP-FT: a linear probe, with its bias and scale). ``opts`` is a
    :class:`~robench.methods.finetune.FineTuneOptions` or any options object with its training
    fields (LP-FT's have no ``lam``: no context term). ``label`` names the run in the progress
    bar.

    Under ``torchrun`` every rank calls this together (DistributedDataParallel); the lead rank
    writes the checkpoints and the result. The result is an open_clip folder
    (:func:`robench.models.backbone.save_derived`) that reloads with the parent's architecture
    config and preprocessing, plus the trained head (``robench_head.npz``: weight (D, C), the
    class names of its label space, and for an ``init`` head its bias and scale).
    """
    world = distributed.current()
    final = out / "model"
    # only the lead (holding the artifact's lock) removes a damaged result
    if world.all_min(int(intact(final, repair=world.is_lead))):
        return f"local-dir:{final}"
    if opts.precision not in PRECISIONS:
        raise RobenchError(f"unknown fine-tuning precision '{opts.precision}'",
                           "use options.precision: fp32, bf16 or fp16")
    lam = getattr(opts, "lam", 0.0)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = backbone.model
    device = backbone.device
    if init is None:
        scale = backbone.logit_scale
        w0 = class_embeddings(backbone, source.classnames, templates, cache_dir, progress)
        b0 = None
    else:
        scale = float(init.scale)
        w0 = np.asarray(init.weight, dtype=np.float32)
        b0 = None if init.bias is None else np.asarray(init.bias, dtype=np.float32)
        if w0.shape != (model.visual.output_dim, len(source.classnames)):
            raise RobenchError(f"the initial head is {w0.shape[0]} x {w0.shape[1]}, not "
                               f"{model.visual.output_dim} features x "
                               f"{len(source.classnames)} classes of {source.name}",
                               "start from a head fitted on this backbone and label space")
    ctx = context_weights(backbone, source.classnames, templates, cache_dir).to(device) \
        if lam else None
    frozen = copy.deepcopy(model.visual).eval() if lam else None  # theta_0, per rank
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    tuned = _Tuned(model.visual, torch.tensor(w0, device=device), scale,
                   None if b0 is None else torch.tensor(b0, device=device))
    params = [p for p in model.visual.parameters()] + [tuned.head]
    if tuned.bias is not None:
        params.append(tuned.bias)
    net = data_parallel(tuned, device, world)
    plan = schedule(params, opts, len(source), device)
    opt, sched, scaler, autocast = plan.opt, plan.sched, plan.scaler, plan.autocast
    bsz, steps_per_epoch, total = opts.batch_size, plan.steps_per_epoch, plan.total
    step = 0
    resume = out / CHECKPOINT
    if (state := load_resume(resume, device)) is not None:  # from its last checkpoint
        model.load_state_dict(state["model"])
        tuned.head.data.copy_(state["head"])
        if tuned.bias is not None:
            tuned.bias.data.copy_(state["bias"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])

    def checkpoint() -> None:  # the lead writes it; every rank holds the same weights
        if world.is_lead:
            state = {"model": model.state_dict(), "head": tuned.head.detach(),
                     "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "scaler": scaler.state_dict(), "step": step}
            if tuned.bias is not None:
                state["bias"] = tuned.bias.detach()
            atomic_write(resume, lambda tmp: torch.save(state, tmp))
            seal_file(resume, bound=binding(resume))  # this run's state, no other's
        world.barrier()

    tf = train_transform(backbone)
    bar = tqdm(total=total, initial=step, unit="step", disable=not (progress and world.is_lead),
               desc=f"{label or ('car-ft' if lam else 'finetune')} {source.name}", leave=False)
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        model.visual.train()
        steps = rank_steps(epoch_order(len(source), seed, epoch), bsz, world,
                           opts.micro_batch)[first:]
        loader = DataLoader(_Labelled(source, tf, seed, epoch),
                            batch_sampler=[m for _, micro in steps for m, _ in micro],
                            num_workers=opts.workers)
        batches = iter(loader)
        for global_size, micro in steps:
            opt.zero_grad(set_to_none=True)
            for j, (_, real) in enumerate(micro):
                x, y = next(batches)
                x, y = x.to(device), y.to(device)
                last = j == len(micro) - 1  # DDP all-reduces on the last micro-batch only
                with (contextlib.nullcontext() if last or net is tuned else net.no_sync()):
                    with autocast():
                        feats, logits = net(x)
                        feats0 = None
                        if frozen is not None:
                            with torch.no_grad():
                                feats0 = frozen(x)
                    loss, kl = car_ft_loss(logits, y, feats, feats0, ctx, scale, lam,
                                           opts.label_smoothing, reduction="sum")
                    # sum of this micro-batch's losses over the global batch size: the step's
                    # gradient is the global mean whatever the split
                    loss = loss / global_size
                    if not real:
                        loss = loss * 0.0
                    scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if opts.grad_clip > 0:  # 0 is no clipping (a max norm of 0 would zero every step)
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            # the last micro-batch's means (``car_ft_loss`` summed them over its samples)
            bar.set_postfix(loss=f"{loss.item() * global_size / len(y):.3f}",
                            kl=f"{kl.item() / len(y):.4f}")
            bar.update(1)
            every = opts.checkpoint_every
            if step % steps_per_epoch == 0 or (every and step % every == 0):
                checkpoint()
    bar.close()
    model.eval()
    if world.is_lead:
        save_derived(backbone, model.state_dict(), final, train_world_size=world.size)
        if init is None:
            save_head(final, tuned.head.detach().cpu().numpy(), list(source.classnames))
        else:
            save_head(final, tuned.head.detach().cpu().numpy(), list(source.classnames),
                      bias=tuned.bias.detach().cpu().numpy() if tuned.bias is not None else None,
                      scale=scale)
        seal_artifact(final)  # last: the folder is complete
        discard(resume)
    world.barrier()  # the result is on disk for every rank
    return f"local-dir:{final}"


def load_resume(path: Path, device: str) -> dict | None:
    """The state saved at the last checkpoint, if it is intact (checksum verified, tensors
    only: ``weights_only=True`` never runs code from the cache); a damaged one is removed."""
    if not path.is_file():
        return None
    try:
        verify_file(path, binding(path))
        return torch.load(path, map_location=device, weights_only=True)
    except (CorruptEntry, RuntimeError, EOFError, ValueError) as e:
        discard(path, reason=f"fine-tuning resume state {path}: {e}")
        return None


HEAD_KINDS = ("linear", "text")


@dataclass(frozen=True)
class SavedHead:
    """The head saved beside a derived checkpoint (``robench_head.npz``).

    ``kind="linear"``: logits = s * (<normalize(f), W> + b), ``weight`` W (D, C) over the label
    space ``classnames``; ``scale`` s None means the checkpoint's own ``exp(logit_scale)``
    (fine-tuning, CAR-FT), ``bias`` b None means no bias. ``kind="text"`` (FLYP): no weight;
    the head is the prompt ensemble of the checkpoint's own text tower, for any label space.
    """

    kind: str
    classnames: list[str]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: float | None = None


def save_head(folder: Path, weight: np.ndarray | None, classnames: list[str],
              bias: np.ndarray | None = None, scale: float | None = None,
              kind: str = "linear") -> None:
    """The trained head beside the derived checkpoint; written last, it marks the folder done.
    Only the fields that are set are written (a fine-tuned head: weight and class names)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}")
    arrays: dict[str, np.ndarray] = {"classnames": np.asarray(classnames, dtype=str)}
    if weight is not None:
        arrays["weight"] = np.asarray(weight, dtype=np.float32)
    if bias is not None:
        arrays["bias"] = np.asarray(bias, dtype=np.float32)
    if scale is not None:
        arrays["scale"] = np.float64(scale)
    if kind != "linear":
        arrays["kind"] = np.asarray(kind)
    write_npz(folder / HEAD_FILE, **arrays)


def read_head(pretrained: str) -> SavedHead:
    """The head saved with a derived ``local-dir:`` checkpoint."""
    folder = Path(pretrained.removeprefix("local-dir:"))
    z = load_npz(folder / HEAD_FILE)
    return SavedHead(kind=str(z["kind"]) if "kind" in z else "linear",
                     classnames=[str(c) for c in z["classnames"]],
                     weight=z["weight"] if "weight" in z else None,
                     bias=z["bias"] if "bias" in z else None,
                     scale=float(z["scale"]) if "scale" in z else None)


def load_head(pretrained: str) -> tuple[np.ndarray, list[str]]:
    """(weight, class names) of the linear head saved with a derived ``local-dir:`` checkpoint."""
    head = read_head(pretrained)
    if head.weight is None:
        raise RobenchError(f"{pretrained} holds a {head.kind} head, not a weight matrix",
                           "read it with robench.models.finetune.read_head")
    return head.weight, head.classnames


def prepare_finetuned(bench: Bench, name: str, spec: ModelSpec,
                      opts: FineTuneOptions) -> ModelSpec:
    """Train (or reuse) the fine-tuned checkpoint; return a spec that loads it."""
    cfg = bench.settings
    source = bench.source(opts.train_on)
    base = load_backbone(spec.arch, spec.pretrained, cfg.device, "fp32",
                         allow_download=cfg.allow_download, seed=cfg.seed)
    templates = bench.templates_for(opts.train_on)
    ident = {"weights": base.weights_hash, "train": source.manifest_hash,
             "opts": opts.identity(),
             "seed": cfg.seed, "templates": templates, "method": spec.method,
             "arch": base.model_cfg, "format": 3}
    out = artifact_dir(cfg.cache_dir, "finetune", ident)
    ckpt = train_once(out, name, lambda: finetune(base, source, templates, opts, out,
                                                  cfg.cache_dir, seed=cfg.seed,
                                                  progress=cfg.progress))
    return replace(spec, pretrained=ckpt)


def train_once(out: Path, name: str, train: Callable[[], str]) -> str:
    """The ``local-dir:`` spec of the derived checkpoint in ``out/model``: read without a lock
    when it is complete and verified (a read-only cache works), else ``train()`` under the
    artifact's lock, so concurrent runs train it once; the ranks of one torchrun job train it
    together, so only their lead takes the lock."""
    final = out / "model"
    world = distributed.current()
    if world.all_min(int(intact(final))):
        return f"local-dir:{final}"
    lock = entry_lock(final, f"fine-tuning {name}") if world.is_lead \
        else contextlib.nullcontext()
    with lock:
        return train()


def finetuned_head(ctx: HeadContext, source: ImageSource) -> LinearHead:
    """The head saved with the checkpoint: a linear head, valid for the label space it was
    trained on (at its saved scale, else the checkpoint's logit scale); or, for a ``text`` head
    (FLYP and its WiSE-FT mixes), the prompt ensemble of the checkpoint's own text tower over
    ``source``'s classes and templates."""
    saved = read_head(ctx.spec.pretrained)
    if saved.kind == "text":
        from robench.models.zeroshot import zeroshot_head

        head = zeroshot_head(ctx.backbone, source.classnames, ctx.templates(source),
                             ctx.template_set(source), ctx.cache_dir, ctx.progress,
                             columns=source.class_subset)
        head.info["head"] = ctx.spec.method
        return head
    if list(source.classnames) != saved.classnames:
        raise RobenchError(
            f"{ctx.spec.method} head was trained on another label space than {source.name}'s",
            "evaluate fine-tuned models on datasets with the training classes")
    scale = ctx.backbone.logit_scale if saved.scale is None else saved.scale
    return LinearHead(weight=saved.weight, scale=scale, classnames=list(source.classnames),
                      bias=saved.bias, info={"head": ctx.spec.method, "logit_scale": scale})
