"""Heads: linear maps on cached, L2-normalised image features."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from robench.errors import RobenchError


@dataclass
class LinearHead:
    """``logits = scale * (features @ weight + bias)``; ``weight`` is (D, K).

    ``classnames`` is the label space (C names). ``columns`` says which labels the K weight
    columns score, in order: None means all of them (K = C, column i = label i). A head built for
    a dataset scored over a sub-list (zero-shot for ImageNet-R/-A) carries only those columns
    (``columns = class_subset``), so the other classes are never encoded nor multiplied.
    """

    weight: np.ndarray
    scale: float
    classnames: list[str]
    bias: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    columns: list[int] | None = None

    def can_score(self, class_subset: list[int] | np.ndarray | None) -> bool:
        """Whether the head has a column for every label of ``class_subset`` (None: all)."""
        if self.columns is None:
            return True
        wanted = range(len(self.classnames)) if class_subset is None else class_subset
        return set(int(c) for c in wanted) <= set(self.columns)

    def restricted(self, columns: np.ndarray | list[int] | None) -> LinearHead:
        """The head over the labels ``columns`` (label-space indices, in that order; None: all
        labels): its columns for them, picked from wherever they sit among the head's own
        ``columns``. For ImageNet-R/-A (200 of 1000) this equals the full head's logits
        restricted to the sub-list up to float rounding (a narrower matrix product may round
        differently), at a fifth of the cost; every robench path (a cell, its ID pairing,
        temperature fitting) scores through it, so they all see the same numbers."""
        if self.columns is None and columns is None:
            return self
        labels = np.arange(len(self.classnames)) if columns is None else \
            np.asarray(columns, dtype=np.int64)
        pos = self.positions(labels)
        if np.array_equal(pos, np.arange(self.weight.shape[1])):  # already exactly these
            weight, bias = self.weight, self.bias
        else:
            weight = np.ascontiguousarray(self.weight[:, pos])
            bias = None if self.bias is None else self.bias[pos]
        return LinearHead(weight=weight, scale=self.scale,
                          classnames=[self.classnames[c] for c in labels], bias=bias,
                          info=self.info)

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Where each label sits among the weight's columns; a RobenchError for labels the head
        has no column for."""
        if self.columns is None:
            return labels
        at = np.full(len(self.classnames), -1, dtype=np.int64)
        at[np.asarray(self.columns, dtype=np.int64)] = np.arange(len(self.columns))
        pos = at[labels]
        if (pos < 0).any():
            lacking = labels[pos < 0].tolist()
            raise RobenchError(
                f"the head has columns for {len(self.columns)} classes, not for {len(lacking)} "
                f"that are scored here (e.g. {lacking[:5]})",
                "build the head for the scored classes of this dataset")
        return pos

    def logits(self, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Float32 logits over the weight's columns, computed in chunks so memory-mapped
        features stream from disk."""
        w = self.weight.astype(np.float32)
        out = np.empty((features.shape[0], w.shape[1]), dtype=np.float32)
        for s in range(0, features.shape[0], chunk):
            out[s:s + chunk] = np.asarray(features[s:s + chunk], dtype=np.float32) @ w
        if self.bias is not None:
            out += self.bias.astype(np.float32)
        out *= np.float32(self.scale)
        return out
