"""Linear probe: multinomial logistic regression on frozen, cached CLIP image features.

The supervised baseline of Radford et al. 2021 ("Learning Transferable Visual Models From Natural
Language Supervision", section 3.2 and appendix A.3) and of CLIP_benchmark: a linear classifier
on the frozen image encoder's features of the ID training split, with its L2 strength chosen on a
held-out validation split.

Objective (identical to scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` with the
multinomial loss; the bias is not penalised):

    min_{W, b}  0.5 * ||W||_F^2  +  C * sum_i CE(softmax(W^T x_i + b), y_i),

minimised here in the equivalent, better-conditioned form ``mean_i CE_i + ||W||^2 / (2 C n)``
(same minimiser, divided by C * n) by full-batch L-BFGS with a strong-Wolfe line search, in
float64 torch. Full-batch L-BFGS from a zero start has no randomness, so a probe is a
deterministic function of its features on a given device; the loss is accumulated over row
chunks so ImageNet-sized problems (1000 classes x 512 dims x 10^5..10^6 rows) fit on a GPU.

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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from robench.artifacts import artifact_dir, ensure
from robench.errors import RobenchError, unknown
from robench.features import FeatureSet
from robench.io import load_npz, read_json, write_json, write_npz
from robench.models.heads import LinearHead
from robench.models.options import list_of

# 8 log-spaced values of C. Features are L2-normalised (|x| = 1), so useful weights are large and
# useful C values sit well above scikit-learn's default of 1.
DEFAULT_GRID: list[float] = [10.0 ** k for k in range(-2, 6)]
# tol bounds the largest gradient entry of the 1/(C n)-scaled objective (scikit-learn's default on
# the same scale is 1e-4); max_iter 1000 as in CLIP's published linear-probe example.
DEFAULTS: dict[str, Any] = {"train_on": "", "val_on": "", "grid": None, "max_iter": 1000,
                            "tol": 1e-6, "refit": "train+val"}
OPTION_TYPES = {"grid": list_of(float)}  # None: the default sweep
REFITS = ("train+val", "train")
# bump when the training procedure changes, so stale cached heads are not reused
VERSION = 1


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


def fit_logistic(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_classes: int,
                 C: float, max_iter: int = 1000, tol: float = 1e-6, device: str = "cpu",
                 init: LogisticFit | None = None, chunk: int = 65536) -> LogisticFit:
    """Multinomial L2 logistic regression by full-batch L-BFGS (float64).

    Minimises ``mean_i CE(W^T x_i + b, y_i) + ||W||_F^2 / (2 C n)``, which is scikit-learn's
    ``0.5 ||W||^2 + C sum_i CE_i`` divided by ``C n``. Stops when the largest gradient entry is
    below ``tol`` or after ``max_iter`` L-BFGS iterations. ``init`` warm-starts from another fit.
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device, torch.float64)
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).to(device, torch.long)
    n, d = x.shape
    if n == 0:
        raise ValueError("no training rows")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels outside [0, {n_classes})")
    # Centring is an exact reparametrisation (W^T x + b = W^T (x - mu) + (b + W^T mu), and b is
    # not penalised), and it removes the large direction all CLIP features share, which
    # otherwise makes the problem ill-conditioned and L-BFGS slow.
    mu = x.mean(dim=0)
    x = x - mu
    w = torch.zeros(d, n_classes, dtype=torch.float64, device=device)
    b = torch.zeros(n_classes, dtype=torch.float64, device=device)
    if init is not None:
        w.copy_(torch.as_tensor(init.weight))
        b.copy_(torch.as_tensor(init.bias) + mu @ w)
    # The objective's scale is ~1 (a mean CE), so tolerance_grad is a meaningful absolute bound.
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=1e-14, history_size=20,
                            line_search_fn="strong_wolfe")
    inv_c = 1.0 / (C * n)
    rows = torch.arange(min(n, chunk), device=device)

    def closure() -> torch.Tensor:
        """Objective and its exact gradient (no autograd graph: memory O(chunk x C)):
        dJ/dW = X^T (P - Y) / n + W / (C n),  dJ/db = 1^T (P - Y) / n."""
        loss = torch.zeros((), dtype=torch.float64, device=device)
        gw = w * inv_c
        gb = torch.zeros_like(b)
        for s in range(0, n, chunk):
            xs, ys = x[s:s + chunk], y[s:s + chunk]
            logp = torch.log_softmax(xs @ w + b, dim=1)
            r = rows[:len(ys)]
            loss -= logp[r, ys].sum() / n
            resid = logp.exp_()
            resid[r, ys] -= 1.0
            gw += xs.T @ resid / n
            gb += resid.sum(0) / n
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


def evaluate(fit: LogisticFit, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy in percent, mean NLL) of a fit on (x, y); argmax ties go to the lower class."""
    logits = np.asarray(x, dtype=np.float64) @ fit.weight + fit.bias
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    acc = 100.0 * float(np.mean(logits.argmax(axis=1) == y))
    nll = float(-logp[np.arange(len(y)), y].mean())
    return acc, nll


def train_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                n_classes: int, grid: list[float] | None = None, max_iter: int = 1000,
                tol: float = 1e-6, refit: str = "train+val", device: str = "cpu") -> ProbeResult:
    """Sweep C on the validation split, then refit (see the module docstring).

    The selected C maximises validation accuracy; ties are broken by lower validation NLL and
    then by the smaller C (stronger regularisation).
    """
    if refit not in REFITS:
        raise unknown("linear-probe refit", refit, REFITS)
    grid = sorted(float(c) for c in (grid if grid is not None else DEFAULT_GRID))
    if not grid or grid[0] <= 0:
        raise RobenchError("linear-probe grid must list positive C values",
                           "e.g. options: {grid: [0.1, 1, 10, 100]}")
    y_val = np.asarray(y_val)
    fits: list[LogisticFit] = []
    accs: list[float] = []
    nlls: list[float] = []
    prev = None
    for c in grid:  # strong -> weak regularisation, each warm-started from the last
        prev = fit_logistic(x_train, y_train, n_classes, c, max_iter, tol, device, init=prev)
        acc, nll = evaluate(prev, x_val, y_val)
        fits.append(prev)
        accs.append(acc)
        nlls.append(nll)
    best = min(range(len(grid)), key=lambda i: (-accs[i], nlls[i], grid[i]))
    fit = fits[best]
    if refit == "train+val":
        x_all = np.concatenate([np.asarray(x_train), np.asarray(x_val)])
        y_all = np.concatenate([np.asarray(y_train), y_val])
        fit = fit_logistic(x_all, y_all, n_classes, grid[best], max_iter, tol, device, init=fit)
    return ProbeResult(fit=fit, grid=grid, val_acc=accs, val_nll=nlls, best_index=best,
                       refit=refit)


# -- runner integration -----------------------------------------------------------------------
def options(spec_options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with defaults filled in; unknown keys are an error."""
    opts = {**DEFAULTS, **spec_options}
    extra = set(opts) - set(DEFAULTS)
    if extra:
        raise unknown("linear-probe option", sorted(extra)[0], DEFAULTS)
    if not opts["train_on"] or not opts["val_on"]:
        raise RobenchError("linear-probe needs options.train_on and options.val_on "
                           "(labelled ID train and validation datasets)",
                           "add options: {train_on: cifar10-subset-probe, "
                           "val_on: cifar10-subset-val}")
    if opts["grid"] is not None:
        opts["grid"] = [float(c) for c in opts["grid"]]
    if opts["refit"] not in REFITS:
        raise unknown("linear-probe refit", opts["refit"], REFITS)
    return opts


def good_rows(source: Any, feats: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the decodable rows (undecodable ones have zero features)."""
    keep = np.ones(len(feats.features), dtype=bool)
    keep[feats.bad] = False
    return np.asarray(feats.features[keep], dtype=np.float64), np.asarray(source.labels)[keep]


def check_label_space(method: str, trained_on: str, trained: list[str], source: Any) -> None:
    if list(source.classnames) != list(trained):
        raise RobenchError(
            f"{method} head was trained on another label space ({trained_on}, "
            f"{len(trained)} classes) than {source.name}'s ({len(source.classnames)} classes)",
            f"evaluate {method} models on datasets with the classes of {trained_on}")


def build(ctx, source) -> LinearHead:  # noqa: ANN001 - see runner.MethodContext
    """Train (or reuse) the probe on ``train_on`` / ``val_on`` and return it as a head."""
    opts = options(dict(ctx.spec.options))
    train_src, train_feats = ctx.features(opts["train_on"])
    val_src, val_feats = ctx.features(opts["val_on"])
    classnames = list(train_src.classnames)
    if list(val_src.classnames) != classnames:
        raise RobenchError(f"linear-probe: {opts['val_on']} and {opts['train_on']} have "
                           "different label spaces", "validate on a split of the same dataset")
    check_label_space("linear-probe", opts["train_on"], classnames, source)
    ident = {"method": "linear-probe", "version": VERSION,
             "weights": ctx.backbone.weights_hash, "backbone": ctx.backbone.id(),
             "train": train_feats.key, "val": val_feats.key, "classnames": classnames,
             "opts": opts, "seed": int(ctx.cfg.seed)}
    out = artifact_dir(ctx.cache_dir, "linear-probe", ident)
    path = out / "head.npz"

    def fit() -> None:
        x_tr, y_tr = good_rows(train_src, train_feats)
        x_va, y_va = good_rows(val_src, val_feats)
        t0 = time.time()
        res = train_probe(x_tr, y_tr, x_va, y_va, len(classnames), opts["grid"],
                          opts["max_iter"], opts["tol"], opts["refit"], ctx.backbone.device)
        summary = {"C": res.fit.C, "grid": res.grid, "val_acc": res.val_acc,
                   "val_nll": res.val_nll, "refit": res.refit, "n_iter": res.fit.n_iter,
                   "n_train": int(len(y_tr) + (len(y_va) if res.refit == "train+val" else 0)),
                   "train_seconds": round(time.time() - t0, 3)}
        write_json(out / "summary.json", summary)
        # written last: its presence marks a complete artifact
        write_npz(path, weight=res.fit.weight.astype(np.float32),
                  bias=res.fit.bias.astype(np.float32), C=np.float64(res.fit.C))

    ensure(out, path.name, fit, f"the linear probe on {opts['train_on']}")
    z = load_npz(path)
    weight, bias, c = z["weight"], z["bias"], float(z["C"])
    summary = read_json(out / "summary.json")
    return LinearHead(weight=weight, scale=1.0, classnames=classnames, bias=bias,
                      info={"head": "linear-probe", "train_on": opts["train_on"],
                            "val_on": opts["val_on"], "C": c, "refit": opts["refit"],
                            "grid": summary.get("grid"), "val_acc": summary.get("val_acc"),
                            "artifact": str(out)})

