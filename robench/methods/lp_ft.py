"""LP-FT: a linear probe, then full fine-tuning of the image tower from it (Kumar et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from robench.methods.base import Bench, HeadContext, Method, option
from robench.methods.finetune import LoopOptions

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.methods.linear_probe import ProbeOptions
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


# The probe options are linear-probe's (same names, defaults and meaning, so that the probe
# stage is the artifact of a linear-probe model with the same options); the fine-tuning options
# are the fine-tuning loop's, with a smaller default lr (see the README's defaults).
@dataclass(frozen=True)
class LPFTOptions(LoopOptions):
    train_on: str = option("", "labelled ID training split: the probe's features, then the "
                           "fine-tuning images", role="train", required=True)
    val_on: str = option("", "labelled validation split that selects the probe's C",
                         role="val", required=True)
    grid: list[float] | None = option(
        None, "probe: inverse L2 strengths C to sweep (null: 8 log-spaced values 1e-2..1e5)",
        minimum=0.0)
    max_iter: int = option(1000, "probe: L-BFGS iterations per C", minimum=1)
    tol: float = option(1e-6, "probe: largest gradient entry of the 1/(C n)-scaled objective "
                        "at stop", minimum=0.0)
    refit: Literal["train+val", "train"] = option(
        "train+val", "probe: refit the selected C on train+val, or keep the train-only fit")
    probe_precision: Literal["auto", "float64", "float32"] = option(
        "auto", "probe: solver precision (linear-probe's precision option)")
    epochs: int = option(5, "fine-tuning epochs over train_on (0: the probe itself)", minimum=0)
    lr: float = option(1e-5, "AdamW peak learning rate of the fine-tuning stage (linear "
                       "warm-up, then cosine to 0)", minimum=0.0)

    def __post_init__(self) -> None:
        if self.grid is not None:  # YAML ints and floats give the same artifact key
            object.__setattr__(self, "grid", [float(c) for c in self.grid])

    def probe(self) -> ProbeOptions:
        """The options of the probe stage, as a linear-probe model would declare them."""
        from robench.methods.linear_probe import ProbeOptions

        return ProbeOptions(train_on=self.train_on, val_on=self.val_on, grid=self.grid,
                            max_iter=self.max_iter, tol=self.tol, refit=self.refit,
                            precision=self.probe_precision)


class LPFT(Method):
    name = "lp-ft"
    summary = ("a linear probe on frozen features, then end-to-end fine-tuning of the image "
               "tower starting from that head")
    source = ("Kumar et al. 2022, 'Fine-Tuning can Distort Pretrained Features and "
              "Underperform Out-of-Distribution', ICLR (robench.models.lp_ft)")
    Options = LPFTOptions
    trains_on_images = True

    def fitted_on(self) -> set[str]:
        fitted = {self.options.train_on}
        return fitted | {self.options.val_on} if self.options.refit == "train+val" else fitted

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        from robench.models.lp_ft import prepare_lp_ft

        return prepare_lp_ft(bench, name, spec, self.options)

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.finetune import finetuned_head

        return finetuned_head(ctx, source)
