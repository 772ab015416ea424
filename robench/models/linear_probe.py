"""Linear probe: multinomial logistic regression on frozen, cached CLIP image features.

The supervised baseline of Radford et al. 2021 ("Learning Transferable Visual Models From Natural
Language Supervision", section 3.2 and appendix A.3) and of CLIP_benchmark: a linear classifier
on the frozen image encoder's features of the ID training split, with its L2 strength chosen on a
held-out validation split.

Objective (identical to scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` with the
multinomial loss; the bias is not penalised):

    min_{W, b}  0.5 * ||W||_F^2  +  C * sum_i CE(softmax(W^T x_i + b), y_i),

minimised here in the equivalent, better-conditioned form ``mean_i CE_i + ||W||^2 / (2 C n)``
(same minimiser, divided by C * n) by full-batch L-BFGS with a strong-Wolfe line search (CLIP's
own choice of solver). Full-batch L-BFGS from a zero start has no randomness, so a probe is a
deterministic function of its features on a given device.

Scale (ImageNet: 1.28M rows x 512..1024 dims x 1000 classes). The objective and its exact
gradient are sums over rows, so each L-BFGS evaluation accumulates them over row blocks that are
streamed onto the backbone's device (the GPU when there is one): the blocks stay on the device
when they fit (half the free GPU memory; 256 MB of RAM on a CPU), otherwise every evaluation
re-reads them from the feature cache with :func:`robench.features.iter_row_blocks` (plain file
reads: resident memory stays O(block x (D + C)) + the L-BFGS history, never N x D). This is not a
stochastic mini-batch method: every step sees the exact full-batch objective, so the solution is
the same minimiser as before, independent of the block size. Precision is picked by size
(``precision: auto``): float64 end to end for small problems (``n d C <= 1e10``, where it is cheap
and matches scikit-learn to ~1e-6), float32 block arithmetic for large ones (2x the CPU
throughput, 2x less memory and bandwidth, and the GPU's fast path), with the L-BFGS parameters,
history and the sums over blocks kept in float64 so rounding does not grow with N.

Model selection (the CLIP / CLIP_benchmark protocol): fit one probe per C of a log-spaced grid
(default 8 values, 1e-2 .. 1e5) on the train split, pick the C with the best validation accuracy
(ties: lower validation NLL, then the smaller C, i.e. the stronger regulariser), then refit with
that C on train + val (``refit: train+val``, the default, as CLIP_benchmark does) or keep the
train-only fit (``refit: train``). The grid is swept from strong to weak regularisation with each
fit warm-started from the previous one, which changes only the number of iterations: the
objective is strictly convex in W (and in b up to a constant shift, which is removed by centring
b; softmax is invariant to it).

The head is ``logits = 1 * (f @ W + b)``: scale 1, bias used; it is valid only for the label space
it was trained on. The trained head is cached as an artifact keyed by the backbone weights, the
train / val feature keys, the options and the seed, and reused while none of them changes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from robench.artifacts import artifact_dir, ensure
from robench.errors import RobenchError, unknown
from robench.features import FeatureSet, iter_row_blocks
from robench.io import load_npz, read_json, write_json, write_npz
from robench.models.heads import LinearHead

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.methods.base import HeadContext
    from robench.methods.linear_probe import ProbeOptions

# 8 log-spaced values of C. Features are L2-normalised (|x| = 1), so useful weights are large and
# useful C values sit well above scikit-learn's default of 1.
DEFAULT_GRID: list[float] = [10.0 ** k for k in range(-2, 6)]
# The method's options (robench.methods.linear_probe): tol bounds the largest gradient entry of
# the 1/(C n)-scaled objective (scikit-learn's default on the same scale is 1e-4); max_iter 1000
# as in CLIP's published linear-probe example.
REFITS = ("train+val", "train")
PRECISIONS = ("auto", "float64", "float32")
# precision "auto": float64 up to this n * d * C (CIFAR-100's 50,000 x 768 x 100 is 3.8e9: still
# seconds per C on a CPU), float32 above (ImageNet's 1.28M x 512 x 1000 is 6.6e11)
EXACT_WORK = 1e10
# centred rows kept in memory between L-BFGS evaluations: at most this much RAM on a CPU (above
# it they are re-read from the cache each evaluation), half the free memory on a GPU
CPU_RESIDENT_BYTES = 256 * 2**20
GPU_RESIDENT_FRACTION = 0.5
BLOCK_BYTES = 64 * 2**20  # one block's (B, C) logits
# bump when the training procedure changes, so stale cached heads are not reused
VERSION = 2
log = logging.getLogger(__name__)


@dataclass
class LogisticFit:
    """One fitted probe: ``weight`` (D, C), ``bias`` (C,) with ``sum(bias) == 0``."""

    weight: np.ndarray
    bias: np.ndarray
    C: float
    n_iter: int
    objective: float  # mean CE + ||W||^2 / (2 C n) at the solution


@dataclass
class ProbeResult:
    """The selected probe plus the sweep that chose it."""

    fit: LogisticFit
    grid: list[float]
    val_acc: list[float]  # percent, one per grid value (train-only fits)
    val_nll: list[float]
    best_index: int
    refit: str
    extra: dict = field(default_factory=dict)


# -- the rows a probe reads, a block at a time --------------------------------------------------
class FeatureRows:
    """The rows of one or more (N, D) feature arrays, read a block at a time, in order.

    A memory-mapped cache file is read with :func:`robench.features.iter_row_blocks` (plain
    file reads as float32, exact for the cache's float16 / float32: pages touched through the
    map would count towards resident memory); an in-memory array is sliced in its own dtype.
    ``keep`` (a boolean mask over the array's rows) drops rows, e.g. undecodable images.
    ``a + b`` chains two sets without copying either (the train+val refit).
    """

    def __init__(self, features: np.ndarray | torch.Tensor, keep: np.ndarray | None = None
                 ) -> None:
        if torch.is_tensor(features):
            features = features.detach().cpu().numpy()
        elif not isinstance(features, np.ndarray):  # a list of rows
            features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {features.shape}")
        if keep is not None and len(keep) != len(features):
            raise ValueError(f"keep mask has {len(keep)} entries for {len(features)} rows")
        self.parts: list[tuple[np.ndarray, np.ndarray | None]] = [(features, keep)]

    @classmethod
    def of(cls, x: FeatureRows | np.ndarray | torch.Tensor) -> FeatureRows:
        return x if isinstance(x, FeatureRows) else cls(x)

    def __len__(self) -> int:
        return sum(len(f) if k is None else int(np.count_nonzero(k)) for f, k in self.parts)

    @property
    def dim(self) -> int:
        return int(self.parts[0][0].shape[1])

    def __add__(self, other: FeatureRows) -> FeatureRows:
        if other.dim != self.dim:
            raise ValueError(f"cannot chain {self.dim}-d and {other.dim}-d features")
        out = FeatureRows.__new__(FeatureRows)
        out.parts = self.parts + other.parts
        return out

    def blocks(self, block: int) -> Iterator[np.ndarray]:
        """The kept rows, ``block`` source rows at a time (fewer where rows are dropped)."""
        for features, keep in self.parts:
            for pos, xb in _raw_blocks(features, block):
                if keep is not None:
                    xb = xb[keep[pos]]
                if len(xb):
                    yield xb


def _raw_blocks(features: np.ndarray, block: int) -> Iterator[tuple[slice, np.ndarray]]:
    if isinstance(features, np.memmap):
        yield from iter_row_blocks(features, block)
        return
    for s in range(0, len(features), block):
        pos = slice(s, min(s + block, len(features)))
        yield pos, features[pos]


# -- how a problem is solved: precision, residency, block size ----------------------------------
@dataclass(frozen=True)
class Plan:
    """float64 or float32 block arithmetic; blocks kept on the device or re-read per pass."""

    dtype: torch.dtype
    resident: bool
    block: int

    def describe(self) -> dict[str, Any]:
        return {"precision": str(self.dtype).removeprefix("torch."),
                "resident": self.resident, "block": self.block}


def plan(n: int, d: int, n_classes: int, device: str = "cpu", precision: str = "auto",
         resident_bytes: int | None = None, block: int | None = None) -> Plan:
    """Pick the precision by size (float64 when ``n d C <= EXACT_WORK``), keep the centred rows
    on the device when they fit in ``resident_bytes`` (default: half the free GPU memory, or
    ``CPU_RESIDENT_BYTES``), and size blocks so one block's (B, C) logits take ~64 MB."""
    if precision not in PRECISIONS:
        raise unknown("linear-probe precision", precision, PRECISIONS)
    if precision == "auto":
        precision = "float64" if n * d * n_classes <= EXACT_WORK else "float32"
    dtype = torch.float64 if precision == "float64" else torch.float32
    item = 8 if dtype == torch.float64 else 4
    if resident_bytes is None:
        resident_bytes = _device_budget(device)
    if block is None:
        block = max(1024, BLOCK_BYTES // (max(n_classes, d) * item))
    return Plan(dtype=dtype, resident=n * d * item <= resident_bytes, block=int(block))


def _device_budget(device: str) -> int:
    """Bytes of centred rows that may stay on ``device`` between L-BFGS evaluations."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_RESIDENT_FRACTION)
    return CPU_RESIDENT_BYTES


class _DeviceRows:
    """Centred training rows on the device, block by block, for the solver's passes.

    Centring is an exact reparametrisation (W^T x + b = W^T (x - mu) + (b + W^T mu), and b is
    not penalised), and it removes the large direction all CLIP features share, which
    otherwise makes the problem ill-conditioned and L-BFGS slow. The mean is accumulated in
    float64 in a first pass, which also keeps the blocks when the plan says they fit.
    """

    def __init__(self, rows: FeatureRows, y: torch.Tensor, how: Plan, device: str) -> None:
        self.rows, self.y, self.how, self.device = rows, y, how, device
        total = torch.zeros(rows.dim, dtype=torch.float64, device=device)
        self.kept: list[torch.Tensor] = []
        for xb in rows.blocks(how.block):
            # a copy when kept (centred in place below; a float64 CPU block could otherwise
            # share memory with the caller's array), else only what .to() needs
            t = torch.as_tensor(xb).to(device, how.dtype, copy=how.resident)
            total += t.sum(0, dtype=torch.float64)
            if how.resident:
                self.kept.append(t)
        self.mu = total / len(rows)
        centre = self.mu.to(how.dtype)
        for t in self.kept:
            t -= centre

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        centre = self.mu.to(self.how.dtype)
        blocks = iter(self.kept) if self.how.resident else (
            torch.as_tensor(xb).to(self.device, self.how.dtype) - centre
            for xb in self.rows.blocks(self.how.block))
        s = 0
        for xs in blocks:
            yield xs, self.y[s:s + len(xs)]
            s += len(xs)


def _labels(y: np.ndarray | torch.Tensor, n: int, n_classes: int, device: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).to(device, torch.long)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} rows")
    if n == 0:
        raise ValueError("no training rows")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels outside [0, {n_classes})")
    return y


def fit_logistic(x: FeatureRows | np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 n_classes: int, C: float, max_iter: int = 1000, tol: float = 1e-6,
                 device: str = "cpu", init: LogisticFit | None = None, chunk: int | None = None,
                 precision: str = "auto", resident_bytes: int | None = None,
                 how: Plan | None = None) -> LogisticFit:
    """Multinomial L2 logistic regression by full-batch L-BFGS over streamed row blocks.

    Minimises ``mean_i CE(W^T x_i + b, y_i) + ||W||_F^2 / (2 C n)``, which is scikit-learn's
    ``0.5 ||W||^2 + C sum_i CE_i`` divided by ``C n``. Stops when the largest gradient entry is
    below ``tol``, when the objective stops changing at the working precision, or after
    ``max_iter`` L-BFGS iterations. ``init`` warm-starts from another fit. ``how`` (else
    :func:`plan` of ``precision``, ``resident_bytes``, ``chunk`` rows a block) says how.
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    rows = FeatureRows.of(x)
    n, d = len(rows), rows.dim
    how = how or plan(n, d, n_classes, device, precision, resident_bytes, chunk)
    data = _DeviceRows(rows, _labels(y, n, n_classes, device), how, device)
    mu = data.mu
    w = torch.zeros(d, n_classes, dtype=torch.float64, device=device)
    b = torch.zeros(n_classes, dtype=torch.float64, device=device)
    if init is not None:
        w.copy_(torch.as_tensor(init.weight))
        b.copy_(torch.as_tensor(init.bias) + mu @ w)
    # The objective's scale is ~1 (a mean CE), so tolerance_grad is a meaningful absolute bound.
    # Parameters and history stay float64 whatever the block precision (D x C x 40 numbers).
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")
    inv_c = 1.0 / (C * n)
    index = torch.arange(how.block, device=device)

    def closure() -> torch.Tensor:
        """Objective and its exact gradient (no autograd graph: memory O(block x C)):
        dJ/dW = X^T (P - Y) / n + W / (C n),  dJ/db = 1^T (P - Y) / n; block terms are
        computed at the plan's precision and summed in float64."""
        loss = torch.zeros((), dtype=torch.float64, device=device)
        gw = w * inv_c
        gb = torch.zeros_like(b)
        wd, bd = w.to(how.dtype), b.to(how.dtype)
        for xs, ys in data:
            logp = torch.log_softmax(torch.addmm(bd, xs, wd), dim=1)
            r = index[:len(ys)]
            loss -= logp[r, ys].sum(dtype=torch.float64) / n
            resid = logp.exp_()
            resid[r, ys] -= 1.0
            gw += (xs.T @ resid).to(torch.float64) / n
            gb += resid.sum(0, dtype=torch.float64) / n
        w.grad, b.grad = gw, gb
        return loss + 0.5 * inv_c * (w * w).sum()

    with torch.no_grad(), few_threads(device, n * d * n_classes):
        opt.step(closure)
        objective = float(closure())
        n_iter = int(opt.state[w].get("n_iter", 0))
        bias = b - mu @ w  # back to raw features
        bias -= bias.mean()  # the unpenalised bias is defined up to a shift; centre it
    return LogisticFit(weight=w.cpu().numpy(), bias=bias.cpu().numpy(), C=float(C),
                       n_iter=n_iter, objective=objective)


@contextlib.contextmanager
def few_threads(device: str, work: float, limit: float = 2e7) -> Iterator[None]:
    """One intra-op thread for small CPU problems: per-op work of a few microseconds gains
    nothing from threads, and OpenMP's spinning threads make each op ~30x slower when the
    cores are shared (measured: 35 ms vs 1.2 ms per L-BFGS step on 1500 x 32 x 10, 2 busy cores).
    Results stay deterministic for a given problem size."""
    if not str(device).startswith("cpu") or work > limit:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(fit: LogisticFit, x: FeatureRows | np.ndarray, y: np.ndarray,
             device: str = "cpu", how: Plan | None = None) -> tuple[float, float]:
    """(accuracy in percent, mean NLL) of a fit on (x, y), streamed in blocks at the plan's
    precision (default float64); argmax ties go to the lower class."""
    rows = FeatureRows.of(x)
    y = torch.as_tensor(np.asarray(y)).to(device, torch.long)
    how = how or Plan(torch.float64, resident=False, block=65536)
    w = torch.as_tensor(fit.weight).to(device, how.dtype)
    b = torch.as_tensor(fit.bias).to(device, how.dtype)
    correct, nll, s = 0, 0.0, 0
    with torch.no_grad(), few_threads(device, len(rows) * rows.dim * w.shape[1]):
        for xb in rows.blocks(how.block):
            logits = torch.addmm(b, torch.as_tensor(xb).to(device, how.dtype), w)
            ys = y[s:s + len(xb)]
            s += len(xb)
            correct += int((logits.argmax(1) == ys).sum())
            logp = torch.log_softmax(logits, dim=1)
            nll -= float(logp.gather(1, ys[:, None]).sum(dtype=torch.float64))
    return 100.0 * correct / len(y), nll / len(y)


def train_probe(x_train: FeatureRows | np.ndarray, y_train: np.ndarray,
                x_val: FeatureRows | np.ndarray, y_val: np.ndarray, n_classes: int,
                grid: list[float] | None = None, max_iter: int = 1000, tol: float = 1e-6,
                refit: str = "train+val", device: str = "cpu", precision: str = "auto",
                resident_bytes: int | None = None) -> ProbeResult:
    """Sweep C on the validation split, then refit (see the module docstring).

    The selected C maximises validation accuracy; ties are broken by lower validation NLL and
    then by the smaller C (stronger regularisation). One :func:`plan` (from the train split's
    size) serves the sweep, the validation scores and the refit.
    """
    if refit not in REFITS:
        raise unknown("linear-probe refit", refit, REFITS)
    grid = sorted(float(c) for c in (grid if grid is not None else DEFAULT_GRID))
    if not grid or grid[0] <= 0:
        raise RobenchError("linear-probe grid must list positive C values",
                           "e.g. options: {grid: [0.1, 1, 10, 100]}")
    x_train, x_val = FeatureRows.of(x_train), FeatureRows.of(x_val)
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    how = plan(len(x_train), x_train.dim, n_classes, device, precision, resident_bytes)
    fits: list[LogisticFit] = []
    accs: list[float] = []
    nlls: list[float] = []
    prev = None
    for c in grid:  # strong -> weak regularisation, each warm-started from the last
        t0 = time.perf_counter()
        prev = fit_logistic(x_train, y_train, n_classes, c, max_iter, tol, device, init=prev,
                            how=how)
        acc, nll = evaluate(prev, x_val, y_val, device=device, how=how)
        log.info("linear-probe C=%g: %d L-BFGS iterations, %.1f s, val acc %.2f%%, nll %.4f",
                 c, prev.n_iter, time.perf_counter() - t0, acc, nll)
        fits.append(prev)
        accs.append(acc)
        nlls.append(nll)
    best = min(range(len(grid)), key=lambda i: (-accs[i], nlls[i], grid[i]))
    fit = fits[best]
    if refit == "train+val":
        both = x_train + x_val
        fit = fit_logistic(both, np.concatenate([y_train, y_val]), n_classes, grid[best],
                           max_iter, tol, device, init=fit,
                           how=plan(len(both), both.dim, n_classes, device, precision,
                                    resident_bytes))
    return ProbeResult(fit=fit, grid=grid, val_acc=accs, val_nll=nlls, best_index=best,
                       refit=refit, extra=how.describe())


# -- the method's head (robench.methods.linear_probe) ---------------------------------------
def good_rows(source: Any, feats: FeatureSet) -> tuple[FeatureRows, np.ndarray]:
    """(features, labels) of the decodable rows (undecodable ones have zero features); the
    features stay in the cache file and are read a block at a time."""
    keep = np.ones(len(feats.features), dtype=bool)
    keep[feats.bad] = False
    return FeatureRows(feats.features, keep), np.asarray(source.labels)[keep]


def check_label_space(method: str, trained_on: str, trained: list[str], source: Any) -> None:
    if list(source.classnames) != list(trained):
        raise RobenchError(
            f"{method} head was trained on another label space ({trained_on}, "
            f"{len(trained)} classes) than {source.name}'s ({len(source.classnames)} classes)",
            f"evaluate {method} models on datasets with the classes of {trained_on}")


def probe_head(ctx: HeadContext, source: ImageSource, opts: ProbeOptions) -> LinearHead:
    """Train (or reuse) the probe on ``train_on`` / ``val_on`` and return it as a head."""
    train_src, train_feats = ctx.features(opts.train_on)
    val_src, val_feats = ctx.features(opts.val_on)
    classnames = list(train_src.classnames)
    if list(val_src.classnames) != classnames:
        raise RobenchError(f"linear-probe: {opts.val_on} and {opts.train_on} have "
                           "different label spaces", "validate on a split of the same dataset")
    check_label_space("linear-probe", opts.train_on, classnames, source)
    ident = {"method": "linear-probe", "version": VERSION,
             "weights": ctx.backbone.weights_hash, "backbone": ctx.backbone.id(),
             "train": train_feats.key, "val": val_feats.key, "classnames": classnames,
             "opts": opts.identity(), "seed": int(ctx.settings.seed)}
    out = artifact_dir(ctx.cache_dir, "linear-probe", ident)
    path = out / "head.npz"

    def fit() -> None:
        x_tr, y_tr = good_rows(train_src, train_feats)
        x_va, y_va = good_rows(val_src, val_feats)
        t0 = time.time()
        res = train_probe(x_tr, y_tr, x_va, y_va, len(classnames), opts.grid, opts.max_iter,
                          opts.tol, opts.refit, ctx.backbone.device, opts.precision)
        summary = {"C": res.fit.C, "grid": res.grid, "val_acc": res.val_acc,
                   "val_nll": res.val_nll, "refit": res.refit, "n_iter": res.fit.n_iter,
                   "n_train": int(len(y_tr) + (len(y_va) if res.refit == "train+val" else 0)),
                   "train_seconds": round(time.time() - t0, 3), **res.extra}
        write_json(out / "summary.json", summary)
        # written last: its presence marks a complete artifact
        write_npz(path, weight=res.fit.weight.astype(np.float32),
                  bias=res.fit.bias.astype(np.float32), C=np.float64(res.fit.C))

    ensure(out, fit, f"the linear probe on {opts.train_on}")
    z = load_npz(path)
    weight, bias, c = z["weight"], z["bias"], float(z["C"])
    summary = read_json(out / "summary.json")
    return LinearHead(weight=weight, scale=1.0, classnames=classnames, bias=bias,
                      info={"head": "linear-probe", "train_on": opts.train_on,
                            "val_on": opts.val_on, "C": c, "refit": opts.refit,
                            "grid": summary.get("grid"), "val_acc": summary.get("val_acc"),
                            "artifact": str(out)})

