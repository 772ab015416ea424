"""Supervised linear probe on frozen image features (Radford et al. 2021, appendix A.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from robench.methods.base import HeadContext, Method, Options, option

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead


@dataclass(frozen=True)
class ProbeOptions(Options):
    train_on: str = option("", "labelled training split (features)", role="train",
                           required=True)
    val_on: str = option("", "labelled validation split that selects C", role="val",
                         required=True)
    grid: list[float] | None = option(
        None, "inverse L2 strengths C to sweep (null: 8 log-spaced values 1e-2..1e5)",
        minimum=0.0)
    max_iter: int = option(1000, "L-BFGS iterations per C", minimum=1)
    tol: float = option(1e-6, "largest gradient entry of the 1/(C n)-scaled objective at stop",
                        minimum=0.0)
    refit: Literal["train+val", "train"] = option(
        "train+val", "refit the selected C on train+val, or keep the train-only fit")
    precision: Literal["auto", "float64", "float32"] = option(
        "auto", "solver precision (auto: float64 up to 1e10 n*D*C, float32 above)")

    def __post_init__(self) -> None:
        if self.grid is not None:  # YAML ints and floats give the same artifact key
            object.__setattr__(self, "grid", [float(c) for c in self.grid])


class LinearProbe(Method):
    name = "linear-probe"
    summary = "L2-regularised multinomial logistic regression on frozen features, C by val"
    source = "Radford et al. 2021, appendix A.3 (robench.models.linear_probe)"
    Options = ProbeOptions

    def fitted_on(self) -> set[str]:
        fitted = {self.options.train_on}
        return fitted | {self.options.val_on} if self.options.refit == "train+val" else fitted

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.linear_probe import probe_head

        return probe_head(ctx, source, self.options)
