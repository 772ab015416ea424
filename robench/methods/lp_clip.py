"""LP-CLIP: a label-free linear probe distilled from zero-shot CLIP, with self-training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from robench.methods.base import HeadContext, Method, Options, option

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead


# lr: the student's logits are s * f @ W with s ~ 100 for real CLIPs, and Adam moves each entry
# of W (entries ~ 1/sqrt(D) ~ 0.04 for unit-norm columns) by ~lr per step, so 1e-4 keeps the
# zero-shot initialisation's scale meaningful over thousands of steps; raise it for tiny models.
@dataclass(frozen=True)
class LPCLIPOptions(Options):
    train_on: str = option("", "training split; only its pixels are read, never its labels",
                           role="train", required=True)
    views: int = option(2, "strong views per image, K (cached: in total; online: per epoch)",
                        minimum=1)
    views_mode: Literal["cached", "online"] = option(
        "cached", "cached: K views encoded once and stored (K passes, N*K*D*itemsize bytes on "
        "disk); online: K fresh views per epoch encoded in the training loop (epochs x rounds "
        "x K passes, no disk)")
    subset: int = option(0, "train on this many images of train_on, a seeded uniform choice "
                         "(not stratified: that needs labels); 0: all", minimum=0)
    temperature: float = option(2.0, "distillation temperature T (T^2-scaled KL)",
                                minimum=1e-6)
    tau: float = option(0.9, "teacher confidence above which the hard pseudo-label term counts",
                        minimum=0.0, maximum=1.0)
    ce_weight: float = option(1.0, "weight lambda of the confident hard pseudo-label CE",
                              minimum=0.0)
    rounds: int = option(2, "self-training rounds (round r >= 2: the last student teaches)",
                         minimum=1)
    epochs: int = option(10, "epochs per round over the N x K (image, view) pairs", minimum=0)
    lr: float = option(1e-4, "AdamW learning rate (cosine to 0 per round)", minimum=0.0)
    weight_decay: float = option(0.01, "AdamW decoupled weight decay on W", minimum=0.0)
    batch_size: int = option(256, "(image, view) pairs per step", minimum=1)
    init: Literal["zeroshot", "random"] = option(
        "zeroshot", "student initialisation: the zero-shot head or random unit columns")
    bias: bool = option(False, "give the student a bias (zero-initialised)")
    crop_scale: float = option(0.35, "smallest random-resized-crop area of a strong view",
                               minimum=0.0, maximum=1.0)
    jitter: float = option(0.4, "colour-jitter strength of a strong view (0: none)",
                           minimum=0.0)
    randaugment: int = option(9, "RandAugment magnitude, 2 ops (0: none)", minimum=0)


class LPCLIP(Method):
    name = "lp-clip"
    summary = ("linear probe trained without labels: distils zero-shot CLIP on strong views, "
               "with self-training")
    source = "Laroudie et al., arXiv 2309.10361 (robench.models.lp_clip)"
    Options = LPCLIPOptions

    def feature_datasets(self) -> list[str]:
        # with a subset, lp-clip extracts the weak view of the chosen images itself: the runner
        # must not encode the whole split for it
        return [] if self.options.subset else super().feature_datasets()

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.lp_clip import lp_clip_head

        return lp_clip_head(ctx, source, self.options)
