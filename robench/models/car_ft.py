"""CAR-FT (Mao et al., arXiv 2211.16175): fine-tuning with a context-preserving KL term.

The training loop is shared with plain fine-tuning (``robench.models.finetune``); this module
only sets lambda (default 1, as in the paper) so the method is one registry entry.
"""

from __future__ import annotations

from robench.models.finetune import DEFAULTS as FINETUNE_DEFAULTS
from robench.models.finetune import finetuned_head, prepare_finetuned
from robench.models.heads import LinearHead
from robench.registry import ModelSpec

DEFAULTS = {**FINETUNE_DEFAULTS, "lam": 1.0}


def prepare(runner, name: str, spec: ModelSpec) -> ModelSpec:
    return prepare_finetuned(runner, name, spec, lam_default=1.0)


def build(ctx, source) -> LinearHead:
    return finetuned_head(ctx, source)
