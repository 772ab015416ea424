"""Heads: linear maps on cached, L2-normalised image features."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LinearHead:
    """``logits = scale * (features @ weight + bias)``; ``weight`` is (D, C)."""

    weight: np.ndarray
    scale: float
    classnames: list[str]
    bias: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def restricted(self, columns: np.ndarray) -> LinearHead:
        """The head over a sub-list of its classes (ImageNet-R/-A: 200 of 1000 columns): the
        logits of the full head restricted to them, up to float rounding (a narrower matrix
        product may round differently), at a fifth of the cost; every robench path uses it."""
        cols = np.asarray(columns, dtype=np.int64)
        return LinearHead(weight=np.ascontiguousarray(self.weight[:, cols]), scale=self.scale,
                          classnames=[self.classnames[c] for c in cols],
                          bias=None if self.bias is None else self.bias[cols], info=self.info)

    def logits(self, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Float32 logits, computed in chunks so memory-mapped features stream from disk."""
        w = self.weight.astype(np.float32)
        out = np.empty((features.shape[0], w.shape[1]), dtype=np.float32)
        for s in range(0, features.shape[0], chunk):
            out[s:s + chunk] = np.asarray(features[s:s + chunk], dtype=np.float32) @ w
        if self.bias is not None:
            out += self.bias.astype(np.float32)
        out *= np.float32(self.scale)
        return out
