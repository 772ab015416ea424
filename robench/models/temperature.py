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
method's options) and ``calibrate_on`` (a labelled dataset): :mod:`robench.methods.temperature`.
Because a head computes ``scale * (f @ W + b)``, the calibrated head is the base head with
``scale / T`` (the bias sits inside the scaled bracket, so it is divided by T with it);
``info.temperature`` records T.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

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
