"""End-to-end fine-tuning of the image tower: plain fine-tuning and CAR-FT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from robench.methods.base import Bench, HeadContext, Method, Options, option

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


# Defaults follow the WiSE-FT line for real CLIPs (AdamW, lr 3e-5, wd 0.1, warm-up, cosine,
# grad-clip 1); the quickstart's tiny model overrides lr and batch_size.
@dataclass(frozen=True)
class LoopOptions(Options):
    """The options of the supervised fine-tuning loop (``robench.models.finetune.finetune``),
    shared by ``finetune``, ``car-ft`` and ``lp-ft``."""

    epochs: int = option(5, "epochs over train_on", minimum=0)
    lr: float = option(3e-5, "AdamW peak learning rate (linear warm-up, then cosine to 0)",
                       minimum=0.0)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay", minimum=0.0)
    batch_size: int = option(128, "GLOBAL batch size (split over torchrun ranks)", minimum=1)
    warmup: int = option(50, "linear warm-up steps", minimum=0)
    grad_clip: float = option(1.0, "gradient-norm clip (0: none)", minimum=0.0)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", minimum=0.0,
                                    maximum=1.0)
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "autocast precision of the forward (weights and optimiser stay fp32)")
    workers: int = option(2, "data-loader worker processes", minimum=0, scheduling=True)
    micro_batch: int = option(0, "samples per forward on a rank, gradients accumulated "
                              "(0: the rank's whole part)", minimum=0, scheduling=True)
    checkpoint_every: int = option(0, "also checkpoint every this many steps (0: per epoch)",
                                   minimum=0, scheduling=True)


@dataclass(frozen=True)
class FineTuneOptions(LoopOptions):
    train_on: str = option("", "labelled ID training split (read as images)", role="train",
                           required=True)
    lam: float = option(0.0, "weight of CAR-FT's context KL (0: plain fine-tuning)",
                        minimum=0.0)


@dataclass(frozen=True)
class CarFTOptions(FineTuneOptions):
    lam: float = option(1.0, "weight lambda of the context KL (the paper's 1)", minimum=0.0)


class FineTune(Method):
    name = "finetune"
    summary = ("end-to-end fine-tuning of the image tower with cross-entropy, head initialised "
               "from the zero-shot weights")
    source = "Wortsman et al. 2022, WiSE-FT section 2 (robench.models.finetune)"
    Options = FineTuneOptions
    trains_on_images = True

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        from robench.models.finetune import prepare_finetuned

        return prepare_finetuned(bench, name, spec, self.options)

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.finetune import finetuned_head

        return finetuned_head(ctx, source)


class CarFT(FineTune):
    name = "car-ft"
    summary = ("fine-tuning with a KL term keeping the encoder's distribution over context "
               "prompts close to the pre-trained one's")
    source = "Mao et al., arXiv 2211.16175 (robench.models.finetune)"
    Options = CarFTOptions
