"""A network that outputs class logits itself (``robench.CustomModel(classifier=...)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from robench.methods.base import HeadContext, Method

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead


class Classifier(Method):
    name = "classifier"
    summary = "a network's own logits, scored as they are (robench.CustomModel(classifier=))"

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.classifier import identity_head

        return identity_head(ctx, source)
