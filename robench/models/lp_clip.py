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
  ``randaugment``), then the backbone's normalisation. Two ways to get them (``views_mode``):

  - ``cached`` (default): ``views`` (K) views per image are precomputed once with seeded
    randomness (``robench.features.extract_features(transform=, view=, seed=)``) and stored in
    the feature cache, so training runs on cached features only: K extra passes over the images
    and N x K x D x itemsize bytes on disk, reused by every epoch, round and later run;
  - ``online``: K fresh views per image in every epoch, decoded and augmented by a DataLoader's
    workers and encoded by the frozen backbone inside the training loop (no_grad, at the run's
    precision, on its device), nothing stored: epochs x rounds x K passes, no disk. A view is a
    function of (seed, round, epoch, image index) alone, whatever the worker count.

  Either way an epoch is one pass over the N x K (image, view) pairs. ``subset`` (M) trains on a
  seeded uniform choice of M images of the split (teacher and student alike); it cannot be
  stratified by class, which would need the labels. The cost of the strong views (encodings,
  bytes on disk, time at the weak view's measured rate) is printed before they start
  (:class:`Budget`).

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

Labels of the training split are never read: the training path, cached or online, sees the
split only as :class:`Unlabelled` (pixels by index, no labels, no file names, no reference to
the labelled source), and no training function here takes a labels argument.

Output head: ``logits = s * (f @ W + b)``, i.e. the student exactly as it was trained (scale = the
logit scale the student was trained at, stored with the artifact). With ``lr: 0`` and
``init: zeroshot`` it is the zero-shot head bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from robench.artifacts import artifact_dir, ensure
from robench.data.base import ImageSource
from robench.errors import RobenchError, unknown
from robench.features import (
    DECODE_ERRORS,
    Collate,
    FeatureSet,
    cached_features,
    extract_features,
    feature_key,
)
from robench.io import load_npz, write_json, write_npz
from robench.models.backbone import Backbone
from robench.models.heads import LinearHead
from robench.models.linear_probe import check_label_space, few_threads
from robench.progress import echo

if TYPE_CHECKING:
    from robench.methods.base import HeadContext
    from robench.methods.lp_clip import LPCLIPOptions
from robench.models.zeroshot import class_embeddings, text_key

# The method's options and their defaults: robench.methods.lp_clip.LPCLIPOptions.
INITS = ("zeroshot", "random")
VIEWS_MODES = ("cached", "online")
log = logging.getLogger(__name__)
VERSION = 2  # bump when training changes, so stale cached heads are not reused
# (2: the teacher's logits are computed per step, not sliced from an (N, C) matrix)


# -- the label firewall -----------------------------------------------------------------------
class Unlabelled:
    """A training split with its labels and sample names removed: pixels by index, the label
    space's class names (the teacher needs them) and the split's identity, nothing else.

    Built from the labelled source's *image reader* only (``source.loader``, a function of the
    row index), so nothing reachable from it leads back to the labelled source, its labels or
    its ``info`` (whose relative paths, ``airplane/00003.jpg``, would reveal the class); reading
    ``.labels`` is an error rather than a silent leak, and messages name rows as ``#i``.
    """

    __slots__ = ("name", "classnames", "manifest_hash", "split_size", "_n", "_read")

    def __init__(self, source: Any) -> None:
        self.name: str = source.name
        self.classnames: list[str] = list(source.classnames)
        self.manifest_hash: str = source.manifest_hash
        self._n = len(source)
        self.split_size = self._n  # images of the whole split (a subset is a part of it)
        # an ImageSource's reader is a function of the index alone (it holds file paths or a
        # pixel array, never the source); other sources can only be read through themselves
        self._read = source.loader if isinstance(source, ImageSource) else source.load_image

    def subset(self, rows: np.ndarray) -> Unlabelled:
        """The images at ``rows`` (distinct indices of this split) as a label-free split of
        their own, row i = image ``rows[i]``; its manifest hash covers the parent's and the rows,
        so its cached features are its own."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(np.unique(rows)) != len(rows) or (
                len(rows) and (rows.min() < 0 or rows.max() >= self._n)):
            raise ValueError(f"a subset of {self.name} needs distinct rows in 0..{self._n - 1}")
        part = object.__new__(Unlabelled)
        part.name = f"{self.name}-subset{len(rows)}"
        part.classnames = list(self.classnames)
        digest = hashlib.sha256(f"{self.manifest_hash}|subset|".encode() + rows.tobytes())
        part.manifest_hash = digest.hexdigest()
        part.split_size, part._n = self.split_size, len(rows)
        part._read = _RowReader(self._read, rows.copy())
        return part

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


class _RowReader:
    """``read(rows[i])``: the reader of a subset (a class, not a closure, so DataLoader workers
    can unpickle it under any start method)."""

    __slots__ = ("read", "rows")

    def __init__(self, read: Any, rows: np.ndarray) -> None:
        self.read, self.rows = read, rows

    def __call__(self, i: int) -> Any:
        return self.read(int(self.rows[i]))


def subset_rows(n: int, subset: int, seed: int) -> np.ndarray | None:
    """The images ``subset`` keeps of a split of ``n``: a uniform choice without replacement
    drawn from ``seed`` (sorted), or None for all of them (``subset`` 0 or >= n).

    Not stratified by class: that would need the labels, which LP-CLIP never reads; each class
    keeps its share of the split in expectation only (binomial spread)."""
    if subset <= 0 or subset >= n:
        return None
    rng = np.random.default_rng([int(seed), 0x5B5E7])  # own stream: not the training's
    return np.sort(rng.choice(n, size=int(subset), replace=False))


def training_split(split: Unlabelled, subset: int, seed: int) -> Unlabelled:
    """``split`` itself, or its seeded ``subset`` (:func:`subset_rows`)."""
    rows = subset_rows(len(split), subset, seed)
    return split if rows is None else split.subset(rows)


# -- strong views -------------------------------------------------------------------------------
def _normalization(backbone: Backbone) -> list[T.Normalize]:
    """The backbone's Normalize step, which the strong views end with as the weak view does;
    none when a declared ``preprocess:`` block normalises nothing (mean / std null)."""
    for t in getattr(backbone.preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return [t]
    declared = backbone.declared_preprocess
    if declared is not None and declared.mean is None:
        return []
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
    ops += [T.ToTensor(), *_normalization(backbone)]
    return T.Compose(ops)


def view_names(opts: LPCLIPOptions, seed: int) -> list[tuple[str, int]]:
    """(cache view name, extraction seed) of each strong view. The name carries every knob the
    transform depends on plus the seed, so a change yields new cached features."""
    aug = {k: getattr(opts, k) for k in ("crop_scale", "jitter", "randaugment")}
    tag = hashlib.sha256(json.dumps(aug, sort_keys=True).encode()).hexdigest()[:10]
    return [(f"lpclip-strong{k}-s{seed}-{tag}", seed * 1009 + k) for k in range(opts.views)]


def _require_unlabelled(source: Any) -> None:
    if not isinstance(source, Unlabelled):
        raise TypeError("lp-clip training data must be wrapped in Unlabelled")


def training_features(backbone: Backbone, source: Unlabelled, cache_dir: str, opts: LPCLIPOptions,
                      seed: int, batch_size: int = 256, num_workers: int = 0,
                      progress: bool = False, strict: bool = False, dtype: str = "auto"
                      ) -> tuple[FeatureSet, list[FeatureSet]]:
    """Weak-view features (the standard cache entry) and the K cached strong views of
    ``source``, stored in ``dtype`` (``model.features_dtype``); the strong views'
    :class:`Budget` is printed before their extraction starts."""
    _require_unlabelled(source)
    kw = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress,
          "strict": strict, "dtype": dtype}
    weak = extract_features(backbone, source, cache_dir, **kw)
    names = view_names(opts, seed)
    done = sum(cached_features(backbone, source, cache_dir, view=v, dtype=dtype) is not None
               for v, _ in names)
    echo(Budget.of(backbone, source, weak, opts, "cached", cached=done).line())
    tf = strong_transform(backbone, opts.crop_scale, opts.jitter, opts.randaugment)
    strong = [extract_features(backbone, source, cache_dir, transform=tf, view=name, seed=s, **kw)
              for name, s in names]
    return weak, strong


# -- what the strong views cost ------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """The cost of a run's strong views, printed before they start (:meth:`line`).

    * ``cached``: ``images x views`` encodings, once (less the views already in the cache), and
      ``images x views x dim x itemsize`` bytes on disk;
    * ``online``: ``images x views`` encodings per epoch, ``x epochs x rounds`` in all, no disk.

    Time >= encodings / rate, where rate is the weak view's measured images per second (decode,
    preprocess and encode at this run's device, batch size and workers), or unknown when the
    weak view's entry carries no timing (written by a sharded run or an older robench). A lower
    bound: the strong views' augmentation adds CPU time (on the 2-core CPU with the tiny model,
    where decoding and augmenting dominate, strong views took 4x the weak view's time per image:
    tests/benchmarks/test_bench_lp_clip.py); with a large model on a GPU fed by enough workers,
    encoding dominates and the bound is close.
    """

    mode: str
    name: str  # the training split
    images: int  # training images that get strong views
    split: int  # images in the whole split (images < split: a subset)
    views: int
    dim: int
    dtype: str  # storage dtype of cached views
    epochs: int
    rounds: int
    cached: int = 0  # views already in the cache (cached mode)
    rate: float | None = None  # weak view's images / s

    @classmethod
    def of(cls, backbone: Backbone, train: Unlabelled, weak: FeatureSet, opts: LPCLIPOptions,
           mode: str, cached: int = 0) -> Budget:
        """The budget of ``train``'s strong views, ``weak`` being its weak view's entry."""
        seconds = weak.seconds
        rate = len(train) / seconds if seconds and seconds > 0 else None
        return cls(mode, train.name, len(train), train.split_size, opts.views,
                   int(weak.features.shape[1]), str(weak.features.dtype),
                   opts.epochs, opts.rounds, cached, rate)

    @property
    def per_pass(self) -> int:
        """Encodings of one set of K views (one epoch online)."""
        return self.images * self.views

    @property
    def encodings(self) -> int:
        """Strong-view encodings this run will compute."""
        if self.mode == "online":
            return self.per_pass * self.epochs * self.rounds
        return self.images * (self.views - self.cached)

    @property
    def disk_bytes(self) -> int:
        """Bytes the strong views occupy in the feature cache (0 online)."""
        if self.mode == "online":
            return 0
        return self.per_pass * self.dim * np.dtype(self.dtype).itemsize

    @property
    def seconds(self) -> float | None:
        return None if self.rate is None else self.encodings / self.rate

    def line(self) -> str:
        of = f"{self.images:,} images"
        if self.images < self.split:
            of += (f" (a seeded subset of {self.split:,}; not stratified by class: that needs "
                   "the labels)")
        itemsize = np.dtype(self.dtype).itemsize
        if self.mode == "online":
            what = (f"{of} x K={self.views} = {self.per_pass:,} encodings per epoch x "
                    f"{self.epochs} epochs x {self.rounds} rounds = {self.encodings:,}, "
                    "nothing on disk")
        else:
            todo = "" if not self.cached else \
                f" ({self.cached} of {self.views} views cached: {self.encodings:,} to encode)"
            what = (f"{of} x K={self.views} = {self.per_pass:,} encodings{todo}; disk "
                    f"{self.per_pass:,} x {self.dim} x {itemsize} B ({self.dtype}) = "
                    f"{_bytes(self.disk_bytes)}")
        when = "time unknown (the weak view's cache entry has no measured rate)" \
            if self.seconds is None else \
            (f"time >= {_duration(self.seconds)} at the weak view's measured "
             f"{self.rate:,.1f} img/s (augmentation adds CPU time)")
        return f"lp-clip strong views ({self.mode}) of {self.name}: {what}; {when}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# -- where a round's (features, image) pairs come from -------------------------------------------
class CachedViews:
    """K precomputed strong views, (K, N, D): each epoch is a seeded permutation of the same
    N x K (image, view) pairs, in mini-batches of ``batch_size`` pairs."""

    mode = "cached"

    def __init__(self, strong: torch.Tensor) -> None:
        if strong.ndim != 3:
            raise ValueError(f"strong views {tuple(strong.shape)} are not (K, N, D)")
        self.strong = strong
        self.views, self.n = int(strong.shape[0]), int(strong.shape[1])

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.views * self.n / batch_size)

    def epoch(self, index: int, batch_size: int, gen: torch.Generator
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, image rows) per step; ``index`` (the epoch) does not change the views."""
        pairs = self.views * self.n
        order = torch.randperm(pairs, generator=gen).to(self.strong.device)
        for s in range(0, pairs, batch_size):
            idx = order[s:s + batch_size]
            view, row = idx // self.n, idx % self.n
            yield self.strong[view, row], row


class OnlineViews:
    """K fresh strong views per image and epoch, encoded by the frozen backbone in the loop.

    Each epoch draws an order of the N images from the training generator; a DataLoader
    (``num_workers`` processes) decodes and augments ``max(1, batch_size // K)`` images per step
    into K views each, and the backbone encodes them (no_grad, at its precision, on its
    device). View k of image i in epoch e is a function of (seed, e, i) only: the image's
    augmentation randomness is seeded from them, whatever worker draws it. Nothing is stored.
    """

    mode = "online"

    def __init__(self, backbone: Backbone, source: Unlabelled, transform: Any, views: int,
                 seed: int, num_workers: int = 0) -> None:
        _require_unlabelled(source)  # the firewall: pixels by index, nothing else
        if views < 1:
            raise ValueError("online strong views need views >= 1")
        self.backbone, self.source, self.transform = backbone, source, transform
        self.views, self.seed, self.num_workers = int(views), int(seed), int(num_workers)
        self.n = len(source)
        self.encoded = 0  # views encoded so far (a count for the budget's check)

    def images_per_step(self, batch_size: int) -> int:
        return max(1, batch_size // self.views)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.n / self.images_per_step(batch_size))

    def loader(self, index: int, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        from torch.utils.data import DataLoader

        workers = self.num_workers
        return DataLoader(_ViewsOfImages(self.source, self.transform, self.views,
                                         _epoch_seed(self.seed, index)),
                          batch_sampler=batches, num_workers=workers,
                          collate_fn=Collate((self.views, 3, self.backbone.image_size,
                                              self.backbone.image_size)),
                          pin_memory=self.backbone.device.startswith("cuda"),
                          prefetch_factor=4 if workers > 0 else None)

    def epoch(self, index: int, batch_size: int, gen: torch.Generator
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B*K, D) float32 on the backbone's device, image rows) per step of epoch
        ``index`` (counted over all rounds, so each round's epochs get views of their own)."""
        order = torch.randperm(self.n, generator=gen).tolist()
        step = self.images_per_step(batch_size)
        batches = [order[s:s + step] for s in range(0, self.n, step)]
        device = self.backbone.device
        for xs, idx, ok in self.loader(index, batches):
            keep = ok.repeat_interleave(self.views)
            if not bool(keep.any()):
                continue
            xs, rows = xs.flatten(0, 1), idx.repeat_interleave(self.views)
            if not bool(keep.all()):  # (indexing would unpin the batch: only when needed)
                xs, rows = xs[keep], rows[keep]
            f = self.backbone.encode_images(xs)
            self.encoded += len(rows)
            yield f, rows.to(device)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**62)


class _ViewsOfImages(torch.utils.data.Dataset):
    """Image i -> (its K strong views (K, 3, H, W) or None when undecodable, i); torch's
    global generator (what torchvision's random transforms draw from) is seeded from (epoch
    seed, i) first, in whichever process reads the image."""

    def __init__(self, source: Unlabelled, transform: Any, views: int, seed: int) -> None:
        self.source, self.transform, self.views, self.seed = source, transform, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        torch.manual_seed((self.seed * 1_000_033 + i) % (2**63))
        try:
            image = self.source.load_image(i)
            return torch.stack([self.transform(image) for _ in range(self.views)]), i
        except DECODE_ERRORS:
            return None, i


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


class Teacher:
    """A linear teacher's logits ``scale * (weak @ W + b)``, computed for the rows a step needs.

    Holding them as one (N, C) matrix would take N x C x 4 bytes (5.1 GB for ImageNet's 1.28M
    images x 1,000 classes, as much again for the student's logits when agreement is
    reported); a step's rows cost a (B, D) x (D, C) product, what the student's forward costs.
    Whole-set statistics (:meth:`labels`) go a block of rows at a time.
    """

    BLOCK = 65_536  # rows per block of a whole-set pass (64K x 1,000 classes: 256 MB)

    def __init__(self, weak: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: float) -> None:
        self.weak, self.scale = weak, float(scale)
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()

    def __len__(self) -> int:
        return int(self.weak.shape[0])

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        out = self.weak[rows].float() @ self.weight
        return self.scale * (out + self.bias if self.bias is not None else out)

    def labels(self) -> torch.Tensor:
        """(N,) argmax class of every row."""
        return torch.cat([self[slice(s, s + self.BLOCK)].argmax(1)
                          for s in range(0, len(self), self.BLOCK)])


def _agreement(student: Teacher, teacher: Teacher) -> float:
    """Share of rows whose argmax classes agree."""
    return float((student.labels() == teacher.labels()).float().mean())


def train_student(strong: torch.Tensor | CachedViews | OnlineViews, teacher: Teacher,
                  w_init: torch.Tensor, scale: float, cfg: LPCLIPConfig, seed: int,
                  weak: torch.Tensor | None = None, first_epoch: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """One round: fit ``z = scale * (strong @ W + b)`` to the teacher's logits.

    ``strong`` is the strong views: a (K, N, D) tensor of cached ones (any float dtype; batches
    are cast to float32), or :class:`CachedViews` / :class:`OnlineViews`; ``teacher`` the
    logits on the weak view (:class:`Teacher`), ``w_init`` (D, C).
    ``weak`` (N, D), when given, is used to report the student's agreement with the teacher
    before and after training. ``first_epoch`` numbers this round's epochs for fresh online
    views. Returns (W, b, stats).
    """
    views = strong if isinstance(strong, (CachedViews, OnlineViews)) else CachedViews(strong)
    device = w_init.device
    w = w_init.detach().clone().float().requires_grad_(True)
    b = torch.zeros(w.shape[1], device=device, requires_grad=True) if cfg.bias else None
    groups = [{"params": [w], "weight_decay": cfg.weight_decay}]
    if b is not None:
        groups.append({"params": [b], "weight_decay": 0.0})  # biases are not decayed
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    steps = cfg.epochs * views.steps(cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(1, steps))))
    gen = torch.Generator().manual_seed(seed)

    def student_logits(x: torch.Tensor) -> torch.Tensor:
        out = x.float() @ w
        return scale * (out + b if b is not None else out)

    stats: dict[str, Any] = {"steps": steps}
    if weak is not None:
        with torch.no_grad():
            stats["agreement_before"] = _agreement(Teacher(weak, w, b, scale), teacher)
    losses: list[float] = []
    for e in range(cfg.epochs):
        total, count, confident = 0.0, 0, 0.0
        for feats, row in views.epoch(first_epoch + e, cfg.batch_size, gen):
            loss, parts = distillation_loss(student_logits(feats), teacher[row],
                                            cfg.temperature, cfg.tau, cfg.ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(row)
            confident += parts["confident"] * len(row)
            count += len(row)
        losses.append(total / max(1, count))
        stats["confident"] = confident / max(1, count)
    stats["loss"] = losses
    if weak is not None:
        with torch.no_grad():
            stats["agreement_after"] = _agreement(Teacher(weak, w, b, scale), teacher)
    return w.detach(), (b.detach() if b is not None else None), stats


def self_train(weak: np.ndarray | torch.Tensor, strong: np.ndarray | torch.Tensor | OnlineViews,
               w_zeroshot: np.ndarray | torch.Tensor, scale: float, cfg: LPCLIPConfig,
               seed: int = 0, device: str = "cpu", progress: bool = False) -> LPCLIPResult:
    """LP-CLIP's R rounds of distillation (see the module docstring). Takes no labels.

    ``weak`` (N, D) are image features, ``strong`` the strong views: (K, N, D) cached features
    or :class:`OnlineViews` of the same N images (row i = image i); ``w_zeroshot`` (D, C) the
    zero-shot class embeddings, ``scale`` the logit scale of teacher and student.
    """
    if cfg.rounds < 1 or cfg.epochs < 0 or cfg.batch_size < 1 or cfg.temperature <= 0:
        raise RobenchError("lp-clip needs rounds >= 1, epochs >= 0, batch_size >= 1 and "
                           "temperature > 0", "fix the lp-clip options")
    # copies: cached features arrive as read-only memory maps
    weak_t = _tensor(weak).to(device, torch.float32)
    if isinstance(strong, OnlineViews):
        views: CachedViews | OnlineViews = strong
        if strong.n != weak_t.shape[0]:
            raise ValueError(f"online views of {strong.n} images for {weak_t.shape[0]} weak rows")
    else:  # kept in its (float16) storage dtype; batches are cast
        strong_t = _tensor(strong).to(device)
        if strong_t.ndim != 3 or strong_t.shape[1:] != weak_t.shape:
            raise ValueError(f"strong views {tuple(strong_t.shape)} do not match weak "
                             f"{tuple(weak_t.shape)} as (K, N, D)")
        views = CachedViews(strong_t)
    w_zs = _tensor(w_zeroshot).to(device, torch.float32)
    teacher = Teacher(weak_t, w_zs, None, scale)  # round 1: zero-shot CLIP on the weak view
    w, b = w_zs, None
    history: list[dict] = []
    with _training_threads(views, device, cfg.batch_size * w_zs.shape[0] * w_zs.shape[1]):
        for r in range(cfg.rounds):
            w, b = _round(r, weak_t, views, teacher, w_zs, scale, cfg, seed, history, progress)
            teacher = Teacher(weak_t, w, b, scale)  # the last student relabels the weak view
    return LPCLIPResult(weight=w.cpu().numpy().astype(np.float32),
                        bias=None if b is None else b.cpu().numpy().astype(np.float32),
                        scale=float(scale), history=history)


@contextlib.contextmanager
def _training_threads(views: CachedViews | OnlineViews, device: str, work: float
                      ) -> Iterator[None]:
    """Cached views: one thread for small CPU problems (:func:`few_threads`). Online views: the
    backbone encodes inside the loop, so all threads; torch's global generator, which the
    in-process (``num_workers=0``) augmentation reseeds per image, is restored afterwards."""
    if isinstance(views, CachedViews):
        with few_threads(device, work):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        yield


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of ``a``: a read-only array (a memory-mapped cache entry) is copied, a
    writable one (the stacked strong views: 5.2 GB at ImageNet scale) is shared, not copied."""
    if torch.is_tensor(a):
        return a
    a = np.asarray(a)
    return torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)


def _round(r: int, weak: torch.Tensor, views: CachedViews | OnlineViews, teacher: Teacher,
           w_zs: torch.Tensor, scale: float, cfg: LPCLIPConfig, seed: int, history: list[dict],
           progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-training round r (0-based): a fresh student fitted to ``teacher``; appends its stats
    to ``history`` and returns (W, b)."""
    gen = torch.Generator().manual_seed(seed * 7919 + r)
    w0 = _init_weight(w_zs, cfg.init, gen)
    encoded = getattr(views, "encoded", 0)
    w, b, stats = train_student(views, teacher, w0, scale, cfg, seed * 7919 + r + 1, weak=weak,
                                first_epoch=r * cfg.epochs)
    stats.update({"round": r + 1, "teacher": "zeroshot" if r == 0 else f"student {r}"})
    if isinstance(views, OnlineViews):
        stats["encoded"] = views.encoded - encoded  # strong views encoded in this round
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
    split = Unlabelled(ctx.bench.source(opts.train_on))
    check_label_space("lp-clip", opts.train_on, split.classnames, source)
    train = training_split(split, opts.subset, seed)
    templates = ctx.bench.templates_for(opts.train_on)
    online = opts.views_mode == "online"
    dtype = ctx.settings.features_dtype  # the run's storage dtype, for every view
    ident = {"method": "lp-clip", "version": VERSION, "weights": backbone.weights_hash,
             "backbone": backbone.id(), "weak": feature_key(backbone, train, dtype=dtype),
             "strong": "online" if online else
             [feature_key(backbone, train, v, dtype) for v, _ in view_names(opts, seed)],
             "text": text_key(backbone, train.classnames, templates), "opts": opts.identity(),
             "seed": seed}
    out = artifact_dir(ctx.cache_dir, "lp-clip", ident)
    path = out / "head.npz"

    def fit() -> None:
        run = ctx.settings
        if online:
            weak, keep, views = _online_training(backbone, train, ctx.cache_dir, opts, seed, run,
                                                 ctx.progress)
        else:
            weak, keep, views = _cached_training(backbone, train, ctx.cache_dir, opts, seed, run,
                                                 ctx.progress)
        w_zs = class_embeddings(backbone, train.classnames, templates, ctx.cache_dir,
                                ctx.progress)
        t0 = time.time()
        res = self_train(np.asarray(weak.features[keep]), views, w_zs, backbone.logit_scale,
                         LPCLIPConfig.from_options(opts), seed, backbone.device, ctx.progress)
        write_json(out / "summary.json", {"history": res.history, "n_train": int(len(keep)),
                                          "n_split": int(train.split_size),
                                          "views_mode": opts.views_mode,
                                          "train_seconds": round(time.time() - t0, 3)})
        arrays = {"weight": res.weight, "scale": np.float64(res.scale)}
        if res.bias is not None:
            arrays["bias"] = res.bias
        write_npz(path, **arrays)  # last: its presence marks a complete artifact

    ensure(out, fit, f"LP-CLIP on {opts.train_on}")
    z = load_npz(path)
    weight, scale = z["weight"], float(z["scale"])
    bias = z.get("bias")
    return LinearHead(weight=weight, scale=scale, classnames=list(train.classnames), bias=bias,
                      info={"head": "lp-clip", "train_on": opts.train_on,
                            "logit_scale": scale, "teacher": "zeroshot (weak view)",
                            "init": opts.init, "views": opts.views,
                            "views_mode": opts.views_mode, "n_train": len(train),
                            "rounds": opts.rounds, "template_set":
                            ctx.bench.template_set_of(opts.train_on),
                            "artifact": str(out)})


def _cached_training(backbone: Backbone, train: Unlabelled, cache_dir: str, opts: LPCLIPOptions,
                     seed: int, run: Any, progress: bool
                     ) -> tuple[FeatureSet, np.ndarray, np.ndarray]:
    """(weak view, rows decodable in every view, their (K, n, D) strong views)."""
    weak, strong = training_features(backbone, train, cache_dir, opts, seed, run.batch_size,
                                     run.num_workers, progress, run.strict, run.features_dtype)
    bad = sorted(set(weak.bad).union(*(s.bad for s in strong)))
    keep = np.setdiff1d(np.arange(len(train)), np.asarray(bad, dtype=np.int64))
    return weak, keep, np.stack([np.asarray(s.features[keep]) for s in strong])


def _online_training(backbone: Backbone, train: Unlabelled, cache_dir: str, opts: LPCLIPOptions,
                     seed: int, run: Any, progress: bool
                     ) -> tuple[FeatureSet, np.ndarray, OnlineViews]:
    """(weak view, its decodable rows, online strong views of those rows); the budget is
    printed before training starts."""
    weak = extract_features(backbone, train, cache_dir, batch_size=run.batch_size,
                            num_workers=run.num_workers, progress=progress, strict=run.strict,
                            dtype=run.features_dtype)
    keep = np.setdiff1d(np.arange(len(train)), np.asarray(weak.bad, dtype=np.int64))
    used = train if len(keep) == len(train) else train.subset(keep)
    echo(replace(Budget.of(backbone, train, weak, opts, "online"), images=len(used)).line())
    tf = strong_transform(backbone, opts.crop_scale, opts.jitter, opts.randaugment)
    return weak, keep, OnlineViews(backbone, used, tf, opts.views, seed, run.num_workers)
