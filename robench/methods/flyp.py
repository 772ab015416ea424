"""FLYP: fine-tune both towers with the CLIP contrastive loss against class-name captions, then
classify zero-shot with the fine-tuned text tower (Goyal et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from robench.methods.base import Bench, HeadContext, Method, Options, option

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


# Defaults: FLYP's ImageNet recipe for ViT-B/16 (locuslab/FLYP README and src/args.py: AdamW,
# lr 1e-5, wd 0.1, batch 512, 10 epochs, 500 warm-up steps then cosine, no gradient clipping);
# the quickstart's tiny model overrides lr, epochs and batch_size.
@dataclass(frozen=True)
class FLYPOptions(Options):
    train_on: str = option("", "labelled ID training split (images; captions are made from "
                           "its class names and templates)", role="train", required=True)
    epochs: int = option(10, "epochs over train_on", minimum=0)
    lr: float = option(1e-5, "AdamW peak learning rate (linear warm-up, then cosine to 0)",
                       minimum=0.0)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (every parameter, as "
                                 "FLYP's code)", minimum=0.0)
    batch_size: int = option(512, "GLOBAL batch size: the contrastive loss's negatives, over "
                             "all torchrun ranks", minimum=2)
    warmup: int = option(500, "linear warm-up steps", minimum=0)
    grad_clip: float = option(0.0, "gradient-norm clip (0: none, as FLYP)", minimum=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "autocast precision of the forward (weights and optimiser stay fp32)")
    workers: int = option(2, "data-loader worker processes", minimum=0, scheduling=True)
    checkpoint_every: int = option(0, "also checkpoint every this many steps (0: per epoch)",
                                   minimum=0, scheduling=True)


class FLYP(Method):
    name = "flyp"
    summary = ("fine-tuning of both towers with the CLIP contrastive loss between images and "
               "class-name captions; evaluated zero-shot with the fine-tuned text tower")
    source = ("Goyal et al. 2023, 'Finetune like you pretrain: Improved finetuning of "
              "zero-shot vision models', CVPR (robench.models.flyp)")
    Options = FLYPOptions
    trains_on_images = True

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        from robench.models.flyp import prepare_flyp

        return prepare_flyp(bench, name, spec, self.options)

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        """The prompt ensemble of the fine-tuned text tower over ``source``'s classes (any
        label space, as zero-shot: FLYP keeps a CLIP)."""
        from robench.models.finetune import finetuned_head

        return finetuned_head(ctx, source)
