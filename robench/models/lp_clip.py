"""LP-CLIP: a linear probe trained WITHOUT labels, by distilling zero-shot CLIP, with
self-training.

Paper: Laroudie, Bursuc, Ha, Franchi, "Improving CLIP Robustness with Knowledge Distillation and
Self-Training", arXiv 2309.10361. The paper's hyper-parameters and augmentation recipe are not
public, so this is robench's documented re-implementation; every choice below is a knob
(``robench.methods.lp_clip.LPCLIPOptions``, listed by ``robench list methods``).

Teacher / student (all on frozen, cached, L2-normalised image features f(x)):

* teacher, round 1: the zero-shot head on the WEAK view (the backbone's own preprocessing,
  resize + centre crop; these are the standard cached features),
  ``t(x) = s * f_weak(x) @ W_zs`` with ``s = backbone.logit_scale`` (exp of the learned
  temperature) and ``W_zs`` the prompt-ensemble class embeddings (``robench.models.zeroshot``);
* student: a linear head on STRONG views, ``z(x') = s * (f_strong(x') @ W + b)`` at the same
  scale s, initialised from ``W_zs`` (``init: zeroshot``) or from random unit-norm columns
  (``init: random``); the bias exists only with ``bias: true`` (zero-initialised);
* strong views: random resized crop (scale ``[crop_scale, 1]``), horizontal flip, colour jitter
  (p = 0.8, strength ``jitter``) and RandAugment (Cubuk et al. 2020; 2 ops at magnitude
  ``randaugment``), then the backbone's normalisation. ``views`` (K) views per image are
  precomputed once with seeded randomness (``robench.features.extract_features(transform=,
  view=, seed=)``), so training runs on cached features only; an epoch is one pass over the
  N x K (image, view) pairs.

Loss per mini-batch B of (image i, view k) pairs, with T = ``temperature``, tau = ``tau`` and
lambda = ``ce_weight``:

    L = T^2 * (1/|B|) sum_B KL( softmax(t_i / T) || softmax(z_ik / T) )          (Hinton et al.
        + lambda * (1/|B|) sum_B 1[max softmax(t_i) >= tau] * CE(z_ik, argmax t_i)   2015; FixMatch)

The T^2 factor keeps the soft-target gradients' magnitude independent of T (Hinton, Vinyals,
Dean 2015, "Distilling the Knowledge in a Neural Network"); the hard term on confident
pseudo-labels follows FixMatch (Sohn et al. 2020), normalised by the batch size.

Self-training: ``rounds`` (R) students are trained one after the other; round r >= 2 relabels the
data with the last student on the weak view, ``t(x) = s * (f_weak(x) @ W_{r-1} + b_{r-1})``, and
trains a fresh student from the same initialisation (as in Noisy Student, Xie et al. 2020).
Optimiser: AdamW (decoupled weight decay on W, none on b), cosine schedule from ``lr`` to 0 over
each round's steps, mini-batches of ``batch_size``, shuffling and random init drawn from
generators seeded by the run's seed, so a given seed gives identical weights.

Labels of the training split are never read: the training path sees the split only as
:class:`Unlabelled` (pixels by index, no labels, no file names, no reference to the labelled
source), and no training function here takes a labels argument.

Output head: ``logits = s * (f @ W + b)``, i.e. the student exactly as it was trained (scale = the
logit scale the student was trained at, stored with the artifact). With ``lr: 0`` and
``init: zeroshot`` it is the zero-shot head bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from robench.artifacts import artifact_dir, ensure
from robench.data.base import ImageSource
from robench.errors import RobenchError, unknown
from robench.features import FeatureSet, extract_features, feature_key
from robench.io import load_npz, write_json, write_npz
from robench.models.backbone import Backbone
from robench.models.heads import LinearHead
from robench.models.linear_probe import check_label_space, few_threads

if TYPE_CHECKING:
    from robench.methods.base import HeadContext
    from robench.methods.lp_clip import LPCLIPOptions
from robench.models.zeroshot import class_embeddings, text_key

# The method's options and their defaults: robench.methods.lp_clip.LPCLIPOptions.
INITS = ("zeroshot", "random")
log = logging.getLogger(__name__)
VERSION = 1  # bump when training changes, so stale cached heads are not reused


# -- the label firewall -----------------------------------------------------------------------
class Unlabelled:
    """A training split with its labels and sample names removed: pixels by index, the label
    space's class names (the teacher needs them) and the split's identity, nothing else.

    Built from the labelled source's *image reader* only (``source.loader``, a function of the
    row index), so nothing reachable from it leads back to the labelled source, its labels or
    its ``info`` (whose relative paths, ``airplane/00003.jpg``, would reveal the class); reading
    ``.labels`` is an error rather than a silent leak, and messages name rows as ``#i``.
    """

    __slots__ = ("name", "classnames", "manifest_hash", "_n", "_read")

    def __init__(self, source: Any) -> None:
        self.name: str = source.name
        self.classnames: list[str] = list(source.classnames)
        self.manifest_hash: str = source.manifest_hash
        self._n = len(source)
        # an ImageSource's reader is a function of the index alone (it holds file paths or a
        # pixel array, never the source); other sources can only be read through themselves
        self._read = source.loader if isinstance(source, ImageSource) else source.load_image

    @property
    def info(self) -> dict:
        return {}  # no paths: file names reveal classes

    def __len__(self) -> int:
        return self._n

    def load_image(self, i: int) -> Any:
        return self._read(i)

    @property
    def labels(self) -> np.ndarray:
        raise RobenchError(f"lp-clip must not read the labels of its training split {self.name}",
                           "this is a bug in robench: LP-CLIP trains on pseudo-labels only")


# -- strong views -------------------------------------------------------------------------------
def _normalization(backbone: Backbone) -> T.Normalize:
    for t in getattr(backbone.preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    raise RobenchError("the backbone's preprocessing has no Normalize step",
                       "lp-clip's strong views need the tag's mean/std")


def strong_transform(backbone: Backbone, crop_scale: float = 0.35, jitter: float = 0.4,
                     randaugment: int = 9) -> T.Compose:
    """PIL image -> normalised tensor: random resized crop, flip, colour jitter, RandAugment.

    Randomness comes from torch's global generator, which ``extract_features(seed=...)`` seeds per
    image, so a view is a deterministic function of (seed, image index).
    """
    ops: list = [T.RandomResizedCrop(backbone.image_size, scale=(crop_scale, 1.0),
                                     interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomHorizontalFlip()]
    if jitter > 0:
        ops.append(T.RandomApply([T.ColorJitter(jitter, jitter, jitter, min(0.1, jitter / 4))],
                                 p=0.8))
    if randaugment > 0:
        ops.append(T.RandAugment(num_ops=2, magnitude=int(randaugment)))
    ops += [T.ToTensor(), _normalization(backbone)]
    return T.Compose(ops)


def view_names(opts: LPCLIPOptions, seed: int) -> list[tuple[str, int]]:
    """(cache view name, extraction seed) of each strong view. The name carries every knob the
    transform depends on plus the seed, so a change yields new cached features."""
    aug = {k: getattr(opts, k) for k in ("crop_scale", "jitter", "randaugment")}
    tag = hashlib.sha256(json.dumps(aug, sort_keys=True).encode()).hexdigest()[:10]
    return [(f"lpclip-strong{k}-s{seed}-{tag}", seed * 1009 + k) for k in range(opts.views)]


def training_features(backbone: Backbone, source: Unlabelled, cache_dir: str, opts: LPCLIPOptions,
                      seed: int, batch_size: int = 256, num_workers: int = 0,
                      progress: bool = False, strict: bool = False
                      ) -> tuple[FeatureSet, list[FeatureSet]]:
    """Weak-view features (the standard cache entry) and the K strong views of ``source``."""
    if not isinstance(source, Unlabelled):
        raise TypeError("lp-clip training data must be wrapped in Unlabelled")
    kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress,
          "strict": strict}
    weak = extract_features(backbone, source, cache_dir, **kw)
    tf = strong_transform(backbone, opts.crop_scale, opts.jitter, opts.randaugment)
    strong = [extract_features(backbone, source, cache_dir, transform=tf, view=name, seed=s, **kw)
              for name, s in view_names(opts, seed)]
    return weak, strong


# -- training (pure functions: features in, weights out; no labels anywhere) ----------------------
@dataclass
class LPCLIPConfig:
    """Training knobs (see the module docstring)."""

    temperature: float = 2.0
    tau: float = 0.9
    ce_weight: float = 1.0
    rounds: int = 2
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    init: str = "zeroshot"
    bias: bool = False

    @classmethod
    def from_options(cls, opts: LPCLIPOptions) -> LPCLIPConfig:
        return cls(**{k: getattr(opts, k) for k in cls.__dataclass_fields__})


@dataclass
class LPCLIPResult:
    weight: np.ndarray  # (D, C) float32
    bias: np.ndarray | None  # (C,) float32 or None
    scale: float
    history: list[dict] = field(default_factory=list)  # one entry per round


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      tau: float, ce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``T^2 KL(softmax(t/T) || softmax(z/T)) + lambda * mean(1[conf >= tau] CE(z, argmax t))``.

    ``student`` / ``teacher`` are (B, C) logits; the KL and CE are averaged over the batch (the
    CE over ALL B rows, unconfident ones contributing 0, as in FixMatch).
    """
    t = float(temperature)
    log_ps = F.log_softmax(student / t, dim=1)
    log_pt = F.log_softmax(teacher / t, dim=1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * t * t
    loss = kl
    frac = 0.0
    if ce_weight:
        conf, hard = F.softmax(teacher, dim=1).max(dim=1)
        mask = (conf >= tau).to(student.dtype)
        ce = (F.cross_entropy(student, hard, reduction="none") * mask).mean()
        loss = loss + ce_weight * ce
        frac = float(mask.mean())
    return loss, {"kl": float(kl.detach()), "confident": frac}


def _init_weight(w_zs: torch.Tensor, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "zeroshot":
        return w_zs.clone()
    if init == "random":  # unit-norm columns, like the class embeddings they replace
        w = torch.randn(w_zs.shape, generator=gen, dtype=torch.float32).to(w_zs.device)
        return F.normalize(w, dim=0)
    raise unknown("lp-clip init", init, INITS)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def train_student(strong: torch.Tensor, teacher: torch.Tensor, w_init: torch.Tensor,
                  scale: float, cfg: LPCLIPConfig, seed: int, weak: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """One round: fit ``z = scale * (strong @ W + b)`` to the teacher's logits.

    ``strong`` is (K, N, D) (any float dtype; batches are cast to float32), ``teacher`` (N, C)
    logits on the weak view, ``w_init`` (D, C). ``weak`` (N, D), when given, is used to report the
    student's agreement with the teacher before and after training. Returns (W, b, stats).
    """
    k_views, n, _ = strong.shape
    device = w_init.device
    w = w_init.detach().clone().float().requires_grad_(True)
    b = torch.zeros(w.shape[1], device=device, requires_grad=True) if cfg.bias else None
    groups = [{"params": [w], "weight_decay": cfg.weight_decay}]
    if b is not None:
        groups.append({"params": [b], "weight_decay": 0.0})  # biases are not decayed
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    pairs = k_views * n
    steps = cfg.epochs * math.ceil(pairs / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(1, steps))))
    gen = torch.Generator().manual_seed(seed)
    teacher = teacher.float()

    def student_logits(x: torch.Tensor) -> torch.Tensor:
        out = x.float() @ w
        return scale * (out + b if b is not None else out)

    stats: dict[str, Any] = {"steps": steps}
    if weak is not None:
        with torch.no_grad():
            stats["agreement_before"] = _agreement(student_logits(weak), teacher)
    losses: list[float] = []
    for _ in range(cfg.epochs):
        order = torch.randperm(pairs, generator=gen).to(device)
        total, count, confident = 0.0, 0, 0.0
        for s in range(0, pairs, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            view, row = idx // n, idx % n
            loss, parts = distillation_loss(student_logits(strong[view, row]), teacher[row],
                                            cfg.temperature, cfg.tau, cfg.ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            confident += parts["confident"] * len(idx)
            count += len(idx)
        losses.append(total / count)
        stats["confident"] = confident / count
    stats["loss"] = losses
    if weak is not None:
        with torch.no_grad():
            stats["agreement_after"] = _agreement(student_logits(weak), teacher)
    return w.detach(), (b.detach() if b is not None else None), stats


def self_train(weak: np.ndarray | torch.Tensor, strong: np.ndarray | torch.Tensor,
               w_zeroshot: np.ndarray | torch.Tensor, scale: float, cfg: LPCLIPConfig,
               seed: int = 0, device: str = "cpu", progress: bool = False) -> LPCLIPResult:
    """LP-CLIP's R rounds of distillation (see the module docstring). Takes no labels.

    ``weak`` (N, D) and ``strong`` (K, N, D) are image features, ``w_zeroshot`` (D, C) the
    zero-shot class embeddings, ``scale`` the logit scale of teacher and student.
    """
    if cfg.rounds < 1 or cfg.epochs < 0 or cfg.batch_size < 1 or cfg.temperature <= 0:
        raise RobenchError("lp-clip needs rounds >= 1, epochs >= 0, batch_size >= 1 and "
                           "temperature > 0", "fix the lp-clip options")
    # copies: cached features arrive as read-only memory maps
    weak_t = _tensor(weak).to(device, torch.float32)
    strong_t = _tensor(strong).to(device)  # kept in its (float16) storage dtype; batches are cast
    if strong_t.ndim != 3 or strong_t.shape[1:] != weak_t.shape:
        raise ValueError(f"strong views {tuple(strong_t.shape)} do not match weak "
                         f"{tuple(weak_t.shape)} as (K, N, D)")
    w_zs = _tensor(w_zeroshot).to(device, torch.float32)
    with torch.no_grad():
        teacher = scale * (weak_t @ w_zs)  # round 1: zero-shot CLIP on the weak view
    w, b = w_zs, None
    history: list[dict] = []
    with few_threads(device, cfg.batch_size * w_zs.shape[0] * w_zs.shape[1]):
        for r in range(cfg.rounds):
            w, b = _round(r, weak_t, strong_t, teacher, w_zs, scale, cfg, seed, history, progress)
            with torch.no_grad():  # relabel with the last student (weak view) for the next round
                teacher = scale * (weak_t @ w + (b if b is not None else 0.0))
    return LPCLIPResult(weight=w.cpu().numpy().astype(np.float32),
                        bias=None if b is None else b.cpu().numpy().astype(np.float32),
                        scale=float(scale), history=history)


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if torch.is_tensor(a) else torch.tensor(np.asarray(a))


def _round(r: int, weak: torch.Tensor, strong: torch.Tensor, teacher: torch.Tensor,
           w_zs: torch.Tensor, scale: float, cfg: LPCLIPConfig, seed: int, history: list[dict],
           progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-training round r (0-based): a fresh student fitted to ``teacher``; appends its stats
    to ``history`` and returns (W, b)."""
    gen = torch.Generator().manual_seed(seed * 7919 + r)
    w0 = _init_weight(w_zs, cfg.init, gen)
    w, b, stats = train_student(strong, teacher, w0, scale, cfg, seed * 7919 + r + 1, weak=weak)
    stats.update({"round": r + 1, "teacher": "zeroshot" if r == 0 else f"student {r}"})
    history.append(stats)
    (log.info if progress else log.debug)(
        "lp-clip round %d/%d: loss %.4f, agreement with teacher %.3f -> %.3f", r + 1,
        cfg.rounds, stats["loss"][-1] if stats["loss"] else float("nan"),
        stats["agreement_before"], stats["agreement_after"])
    return w, b


# -- the method's head (robench.methods.lp_clip) ---------------------------------------------
def lp_clip_head(ctx: HeadContext, source: ImageSource, opts: LPCLIPOptions) -> LinearHead:
    """Train (or reuse) the LP-CLIP student on ``train_on`` and return it as a head."""
    backbone, seed = ctx.backbone, int(ctx.settings.seed)
    # the split is read only through its index, never as labelled features
    train = Unlabelled(ctx.bench.source(opts.train_on))
    check_label_space("lp-clip", opts.train_on, train.classnames, source)
    templates = ctx.bench.templates_for(opts.train_on)
    ident = {"method": "lp-clip", "version": VERSION, "weights": backbone.weights_hash,
             "backbone": backbone.id(), "weak": feature_key(backbone, train),
             "strong": [feature_key(backbone, train, v) for v, _ in view_names(opts, seed)],
             "text": text_key(backbone, train.classnames, templates), "opts": opts.identity(),
             "seed": seed}
    out = artifact_dir(ctx.cache_dir, "lp-clip", ident)
    path = out / "head.npz"

    def fit() -> None:
        run = ctx.settings
        weak, strong = training_features(backbone, train, ctx.cache_dir, opts, seed,
                                         run.batch_size, run.num_workers, ctx.progress,
                                         run.strict)
        bad = sorted(set(weak.bad).union(*(s.bad for s in strong)))
        keep = np.setdiff1d(np.arange(len(train)), np.asarray(bad, dtype=np.int64))
        w_zs = class_embeddings(backbone, train.classnames, templates, ctx.cache_dir,
                                ctx.progress)
        t0 = time.time()
        res = self_train(np.asarray(weak.features[keep]),
                         np.stack([np.asarray(s.features[keep]) for s in strong]),
                         w_zs, backbone.logit_scale, LPCLIPConfig.from_options(opts), seed,
                         backbone.device, ctx.progress)
        write_json(out / "summary.json", {"history": res.history, "n_train": int(len(keep)),
                                          "train_seconds": round(time.time() - t0, 3)})
        arrays = {"weight": res.weight, "scale": np.float64(res.scale)}
        if res.bias is not None:
            arrays["bias"] = res.bias
        write_npz(path, **arrays)  # last: its presence marks a complete artifact

    ensure(out, path.name, fit, f"LP-CLIP on {opts.train_on}")
    z = load_npz(path)
    weight, scale = z["weight"], float(z["scale"])
    bias = z.get("bias")
    return LinearHead(weight=weight, scale=scale, classnames=list(train.classnames), bias=bias,
                      info={"head": "lp-clip", "train_on": opts.train_on,
                            "logit_scale": scale, "teacher": "zeroshot (weak view)",
                            "init": opts.init, "views": opts.views,
                            "rounds": opts.rounds, "template_set":
                            ctx.bench.template_set_of(opts.train_on),
                            "artifact": str(out)})
