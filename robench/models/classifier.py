"""The ``classifier`` method: a network that outputs class logits itself, scored as-is.

For ``robench.CustomModel(classifier=module, preprocess=...)``. Its "features" are its logits,
extracted and cached like image features, as the float16 pair ``[hi, lo]`` that
:meth:`robench.models.custom.ModuleBackbone.encode_images` writes; the head is the identity on
the pair, ``logits = hi + lo`` (weight ``[I; I]``, scale 1, no bias), so the scored logits are the
network's float32 logits to ~2^-22 relative. The outputs must be the evaluated dataset's label
space in its ``classnames`` order (ImageNet-R/-A: 1000 outputs, restricted to their 200 as for
any model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from robench.errors import RobenchError
from robench.models.heads import LinearHead

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.methods.base import HeadContext


def identity_head(ctx: HeadContext, source: ImageSource) -> LinearHead:
    """The identity head over the cached logit pairs of ``source``."""
    if getattr(ctx.backbone, "kind", None) != "classifier":
        raise RobenchError(f"method 'classifier' needs a network that outputs logits, not "
                           f"{ctx.backbone.arch}",
                           "use robench.CustomModel(classifier=module, preprocess=...)")
    _, feats = ctx.features(source.name)
    n_classes = len(source.classnames)
    outputs = feats.features.shape[1] // 2
    if outputs != n_classes:
        raise RobenchError(f"{ctx.backbone.arch} outputs {outputs} logits but {source.name} has "
                           f"{n_classes} classes",
                           f"evaluate it on datasets with its {outputs} classes (in the "
                           "dataset's class order), or use it as image_encoder= with a "
                           "linear probe")
    eye = np.eye(n_classes, dtype=np.float32)
    return LinearHead(weight=np.concatenate([eye, eye]), scale=1.0,
                      classnames=list(source.classnames),
                      info={"head": "classifier", "outputs": outputs,
                            "logits": "the network's own (float16 hi + lo pair)"})
