"""Temperature scaling of any head: the standard post-hoc calibration baseline.

Guo, Pleiss, Sun, Weinberger 2017, "On Calibration of Modern Neural Networks" (ICML), section
4.2: a single scalar T > 0 divides every logit,

    p(y | x) = softmax(z(x) / T),    T* = argmin_{T > 0}  -(1/n) sum_i log softmax(z_i / T)[y_i],

fitted on a labelled validation split (``calibrate_on``) with the base head frozen. Dividing all
logits by the same T never changes the arg-max, so accuracy is untouched; only the confidences
move. The NLL is convex in beta = 1/T (the logits are linear in beta and the log-sum-exp is
convex), so the optimum is unique; it is found by L-BFGS on u = log T (unconstrained, keeps
T > 0) in float64, and clipped to [1e-3, 1e3] (an unbounded optimum means the validation set is
separable, T -> 0, or uninformative, T -> inf).

The wrapped model is declared as ``method: temperature-scaling`` with options ``base`` (a method
name, e.g. ``zeroshot``, ``linear-probe``, ``lp-clip``, ``finetune``), ``base_options`` (that
method's options) and ``calibrate_on`` (a labelled dataset). Because a head computes
``scale * (f @ W + b)``, the calibrated head is the base head with ``scale / T`` (the bias sits
inside the scaled bracket, so it is divided by T with it); ``info.temperature`` records T.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib import import_module
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robench.errors import RobenchError, unknown
from robench.models import METHODS
from robench.models.heads import LinearHead
from robench.registry import ModelSpec

DEFAULTS: dict[str, Any] = {"base": "zeroshot", "base_options": {}, "calibrate_on": ""}
BASE = ("base", "base_options")  # the wrapped method and its options, checked like the model's
T_MIN, T_MAX = 1e-3, 1e3
log = logging.getLogger(__name__)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200,
                    tol: float = 1e-10) -> float:
    """T* = argmin_T NLL(softmax(logits / T), labels), by L-BFGS on log T (Guo et al. 2017).

    Clipped to [T_MIN, T_MAX]; a split classified perfectly has no finite optimum and gets T_MIN.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need (n, C) logits and n labels, got {tuple(z.shape)} and {len(y)}")
    top2 = z.topk(2, dim=1).values if z.shape[1] > 1 else None
    if top2 is not None and bool(((z.argmax(1) == y) & (top2[:, 0] > top2[:, 1])).all()):
        # every sample right with a margin: NLL decreases all the way to T -> 0
        log.warning("temperature-scaling: the calibration split is perfectly classified; "
                    "the NLL optimum is T -> 0, clipped to %g", T_MIN)
        return T_MIN
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-log_t), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(np.exp(log_t.item()), T_MIN, T_MAX))


def options(spec_options: dict[str, Any]) -> dict[str, Any]:
    opts = {**DEFAULTS, **spec_options}
    extra = set(opts) - set(DEFAULTS)
    if extra:
        raise unknown("temperature-scaling option", sorted(extra)[0], DEFAULTS)
    if opts["base"] not in METHODS:
        raise unknown("method", opts["base"], METHODS, fix="set options.base to a method name")
    if not opts["calibrate_on"]:
        raise RobenchError("temperature-scaling needs options.calibrate_on (a labelled "
                           "validation dataset)", "add options: {calibrate_on: "
                           "cifar10-subset-val}")
    opts["base_options"] = dict(opts["base_options"] or {})
    return opts


def base_spec(spec: ModelSpec) -> ModelSpec:
    """The wrapped model's spec: same backbone, the base method and its options."""
    opts = options(dict(spec.options))
    return replace(spec, method=opts["base"], options=opts["base_options"])


def trained_on(spec: ModelSpec) -> set[str]:
    """Datasets a base head has been fitted on (labels or not)."""
    used = {spec.options.get("train_on")}
    if spec.method == "linear-probe" and spec.options.get("refit", "train+val") == "train+val":
        used.add(spec.options.get("val_on"))
    return {u for u in used if u}


def prepare(runner, name: str, spec: ModelSpec) -> ModelSpec:  # noqa: ANN001 - runner.Runner
    """Let a backbone-changing base (finetune, car-ft, wise-ft) train or reuse its checkpoint,
    and point this model at it; heads-only bases need nothing."""
    base = base_spec(spec)
    module = import_module(METHODS[base.method])
    if not hasattr(module, "prepare"):
        return spec
    ready = module.prepare(runner, name, base)
    return replace(spec, arch=ready.arch, pretrained=ready.pretrained,
                   options={**spec.options, "base_options": dict(ready.options)})


def build(ctx, source) -> LinearHead:  # noqa: ANN001 - see runner.MethodContext
    """The base head, with its scale divided by T fitted on ``calibrate_on``."""
    from robench.scoring import scored_columns  # lazily: scoring imports the heads

    opts = options(dict(ctx.spec.options))
    spec = base_spec(ctx.spec)
    base = import_module(METHODS[spec.method])
    head = base.build(replace(ctx, spec=spec), source)
    val_src, val_feats = ctx.features(opts["calibrate_on"])
    if list(val_src.classnames) != list(head.classnames):
        raise RobenchError(
            f"temperature-scaling: {opts['calibrate_on']} has another label space than the "
            f"{spec.method} head for {source.name}",
            "calibrate on a validation split with the evaluated dataset's classes")
    if opts["calibrate_on"] in trained_on(spec):
        log.warning("temperature-scaling of %s: %s is also data the base head was trained on, "
                    "so T fitted there under-corrects over-confidence (for linear-probe use "
                    "refit: train, or calibrate on another split)", spec.method,
                    opts["calibrate_on"])
    columns, labels = scored_columns(val_src)
    # a head built over the evaluated set's sub-list only (zero-shot for ImageNet-R) has no
    # columns for the rest of a validation split's classes: T is fitted with the base head
    # built for that split, i.e. the T the full head gets
    val_head = head if head.can_score(columns) else base.build(replace(ctx, spec=spec), val_src)
    logits = val_head.restricted(columns).logits(val_feats.features)
    keep = np.ones(len(labels), dtype=bool)
    keep[val_feats.bad] = False
    logits, labels = logits[keep], labels[keep]
    t = fit_temperature(logits, labels)
    info = {**head.info, "base_method": spec.method, "calibration": "temperature-scaling",
            "temperature": t, "calibrate_on": opts["calibrate_on"],
            "calibration_nll_before": nll(logits, labels), "calibration_nll_after":
            nll(logits, labels, t)}
    return LinearHead(weight=head.weight, scale=head.scale / t, classnames=list(head.classnames),
                      bias=head.bias, info=info, columns=head.columns)
