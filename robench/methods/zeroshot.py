"""Zero-shot CLIP: the prompt-ensemble classifier of the text tower (no training)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from robench.methods.base import HeadContext, Method

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead


class ZeroShot(Method):
    name = "zeroshot"
    summary = "the text tower's prompt ensemble over the dataset's classes (no training)"
    source = "Radford et al. 2021, section 3.1.4 (robench.models.zeroshot)"

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        """A head over exactly the classes ``source`` is scored over (its ``class_subset``)."""
        from robench.models.zeroshot import zeroshot_head

        return zeroshot_head(ctx.backbone, source.classnames, ctx.templates(source),
                             ctx.template_set(source), ctx.cache_dir, ctx.progress,
                             columns=source.class_subset)
