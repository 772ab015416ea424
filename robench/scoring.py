"""Scoring one cell: cached features -> head logits, streamed in blocks of rows -> exact
per-sample outputs -> metrics per group and headline.

Peak memory is O(N) per-sample values plus one block of logits, whatever N x C is: an
ImageNet-C cell (3.75M images x 1000 classes) never holds its 15 GB of logits. The per-sample
outputs (:class:`CellOutputs`) are stored beside the record and are everything the metrics need,
so ``robench rescore`` recomputes every metric of a record from them, exactly, without a model.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import robench.metrics as M  # noqa: N812
from robench.clustered import Clusters, SampleValues, headline_intervals
from robench.data.base import ImageSource
from robench.errors import RobenchError
from robench.features import FeatureSet, iter_row_blocks
from robench.io import write_npz
from robench.models.heads import LinearHead

OUTPUTS_VERSION = 3  # 3: base image of each row, the paired ID set's correctness
# Rows per block: about 16M logits (64 MB of float32) per block, at least 1024 rows.
_BLOCK_ELEMENTS = 1 << 24


def block_rows(num_classes: int) -> int:
    return max(1024, _BLOCK_ELEMENTS // max(1, num_classes))


@dataclass
class CellOutputs:
    """Everything stored per sample of a cell (row i = sample i of the dataset).

    ``samples`` are over the scored columns (``scored_classes``, label-space indices; None: all
    classes of the head); ``label`` is in the dataset's own label space (ImageNet-R: 1k indices)
    and ``target`` its position among the scored columns. ``group`` indexes ``group_names``
    (-1: no groups), ``valid`` is False for images that could not be decoded (excluded from every
    metric). ``base`` names the base image each row is a copy of (a -C set: the copies of one image
    in every group share it, and intervals resample base images; None: every row is its own).
    ``ood_id_conf`` holds the paired ID set's MSP over the same scored columns, which
    ``ood_auroc`` compares with this cell's, and ``ood_id_correct`` whether each of those ID
    samples is right over these columns (``id_acc1``, effective robustness's x-axis).
    """

    samples: M.SampleOutputs
    label: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    group: np.ndarray
    group_names: list[str]
    scored_classes: np.ndarray | None
    sample_ids: np.ndarray | None  # utf-8 relative paths; None: the row index is the id
    base: np.ndarray | None = None
    logits: np.ndarray | None = None
    ood_id_conf: np.ndarray | None = None
    ood_id_correct: np.ndarray | None = None

    def rows(self, group: str | None = None) -> np.ndarray:
        """Valid rows of one group (or of the whole cell)."""
        mask = self.valid.copy()
        if group is not None:
            mask &= self.group == self.group_names.index(group)
        return np.flatnonzero(mask)

    def save(self, path: Path) -> None:
        s = self.samples
        arrays = {
            "version": np.int64(OUTPUTS_VERSION), "num_classes": np.int64(s.num_classes),
            "label": self.label.astype(np.int64), "target": self.target.astype(np.int32),
            "valid": self.valid, "group": self.group.astype(np.int32),
            "group_names": np.asarray(self.group_names, dtype=str),
            "topk_index": s.topk_index, "topk_logit": s.topk_logit, "log_norm": s.log_norm,
            "true_logit": s.true_logit, "label_rank": s.label_rank, "sum_sq_prob": s.sum_sq_prob,
        }
        if self.scored_classes is not None:
            arrays["scored_classes"] = np.asarray(self.scored_classes, dtype=np.int64)
            arrays["topk_class"] = arrays["scored_classes"][s.topk_index]
        else:
            arrays["topk_class"] = s.topk_index.astype(np.int64)
        optional = {"sample_id": self.sample_ids, "base": self.base, "logits": self.logits,
                    "ood_id_conf": self.ood_id_conf, "ood_id_correct": self.ood_id_correct}
        arrays.update({k: v for k, v in optional.items() if v is not None})
        write_npz(path, seal=False, **arrays)  # its record holds its sha256

    @classmethod
    def load(cls, path: Path) -> CellOutputs:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "version" not in z.files or int(z["version"]) != OUTPUTS_VERSION:
                    raise RobenchError(
                        f"{path} holds per-sample outputs of an older robench (without the "
                        "base image of each row, or float16 probabilities), from which metrics "
                        "cannot be recomputed as this version computes them",
                        "re-run the suite to rebuild its cells (robench run suite=...; cells of "
                        "older protocols are recomputed)")
                samples = M.SampleOutputs(z["topk_index"], z["topk_logit"], z["log_norm"],
                                          z["true_logit"], z["label_rank"], z["sum_sq_prob"],
                                          int(z["num_classes"]))
                return cls(samples=samples, label=z["label"], target=z["target"],
                           valid=z["valid"], group=z["group"],
                           group_names=[str(g) for g in z["group_names"]],
                           scored_classes=z["scored_classes"] if "scored_classes" in z.files
                           else None,
                           **{f: z[k] if k in z.files else None for f, k in (
                               ("sample_ids", "sample_id"), ("base", "base"),
                               ("logits", "logits"), ("ood_id_conf", "ood_id_conf"),
                               ("ood_id_correct", "ood_id_correct"))})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise RobenchError(f"cannot read per-sample outputs {path}: {e}",
                               "re-run the cell (robench run ... force=true)") from e


def scored_columns(source: ImageSource) -> tuple[np.ndarray | None, np.ndarray]:
    """(label-space indices of the scored columns or None for all, target position of each
    sample). ImageNet-R/-A score their 200 classes of 1000."""
    labels = np.asarray(source.labels, dtype=np.int64)
    if source.class_subset is None:
        return None, labels.astype(np.int32)
    subset = np.asarray(source.class_subset, dtype=np.int64)
    target = column_positions(subset, labels)
    if (target < 0).any():
        bad = sorted(set(labels[target < 0].tolist()))[:5]
        raise RobenchError(f"{source.name}: labels {bad} are not in the scored class sub-list",
                           "check the dataset's class folders against its sub-list")
    return subset, target.astype(np.int32)


def column_positions(columns: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The position of each label among ``columns`` (label-space indices, in scoring order);
    -1 for a label that is not among them."""
    columns = np.asarray(columns, dtype=np.int64)
    position = np.full(int(max(columns.max(), labels.max(initial=0))) + 1, -1, dtype=np.int64)
    position[columns] = np.arange(len(columns))
    return position[labels]


def stream_logits(head: LinearHead, features: np.ndarray, columns: np.ndarray | None,
                  rows: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """(positions, float32 logits over ``columns``, label-space indices; None: all labels) a
    block at a time; ``rows`` picks rows."""
    sub = head.restricted(columns)
    c = sub.weight.shape[1]
    for pos, block in iter_row_blocks(features, block_rows(c), rows):
        yield pos, sub.logits(block)


def cell_outputs(head: LinearHead, feats: FeatureSet, source: ImageSource,
                 keep_logits: bool = False) -> CellOutputs:
    """Stream the cell through the head into exact per-sample outputs."""
    columns, target = scored_columns(source)
    n = len(source)
    c = len(head.classnames) if columns is None else len(columns)
    samples = M.SampleOutputs.empty(n, min(M.TOPK, c), c)
    logits = None
    for pos, block in stream_logits(head, feats.features, columns):
        M.sample_outputs(block, target[pos], out=samples, offset=pos.start)
        if keep_logits:
            if logits is None:
                logits = np.empty((n, block.shape[1]), dtype=np.float32)
            logits[pos] = block
    valid = np.ones(n, dtype=bool)
    valid[feats.bad] = False
    group = np.full(n, -1, dtype=np.int32)
    names = list(source.groups or {})
    for gi, g in enumerate(names):
        group[source.groups[g]] = gi
    paths = source.info.get("paths")
    ids = np.char.encode(np.asarray(paths, dtype=str), "utf-8") if paths else None
    base = None if source.base_index is None else np.asarray(source.base_index, dtype=np.int64)
    return CellOutputs(samples=samples, label=np.asarray(source.labels),
                       target=target, valid=valid, group=group, group_names=names,
                       scored_classes=columns, sample_ids=ids, base=base, logits=logits)


def id_confidence(head: LinearHead, id_feats: FeatureSet, id_source: ImageSource,
                  columns: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(MSP, correct) of the ID set's decodable samples over the same scored columns as the
    shifted cell, from exact float32 logits: ID samples whose class is not among the columns are
    left out, so both sides of ``ood_auroc`` are the same task (ImageNet val restricted to
    ImageNet-R's 200 classes against ImageNet-R), and the share correct is the ID accuracy over
    those classes (Taori et al. 2020's ``val-on-imagenet-r-classes``, effective robustness's
    x-axis). The ID set paired with itself gives exactly 0.5 and its own accuracy."""
    labels = np.asarray(id_source.labels, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    keep[id_feats.bad] = False
    if columns is not None:
        keep &= np.isin(labels, columns)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise RobenchError(f"{id_source.name} has no sample of the scored classes",
                           "pair the shifted set with an ID set that shares its classes")
    target = labels[rows] if columns is None else column_positions(columns, labels[rows])
    conf, correct = np.empty(rows.size), np.empty(rows.size, dtype=bool)
    for pos, block in stream_logits(head, id_feats.features, columns, rows):
        # the same computation as the shifted side (sample_outputs), so equal inputs give
        # bit-equal confidences and the same correctness
        s = M.sample_outputs(block, target[pos])
        conf[pos], correct[pos] = s.conf, s.correct
    return conf, correct


def cell_metrics(out: CellOutputs, summary_groups: list[str] | None, *, n_bins: int,
                 n_bootstrap: int, seed: int, alpha: float,
                 adaptive_bins: str = "robench") -> tuple[dict, dict | None]:
    """(headline metrics, per-group metrics or None) of stored outputs: the only path from
    outputs to metrics, used by the run and by ``robench rescore`` alike.

    A grouped cell's headline is the unweighted mean over its summary groups, with intervals
    from the bootstrap over base images (:func:`robench.clustered.headline_intervals`); a cell
    paired with an ID set also gets ``id_acc1``, the ID set's accuracy over its scored classes."""
    kw = {"n_bins": n_bins, "n_bootstrap": n_bootstrap, "seed": seed, "alpha": alpha,
          "adaptive_bins": adaptive_bins}

    def metrics(rows: np.ndarray, what: str) -> dict:
        if rows.size == 0:
            raise RobenchError(f"{what}: no decodable image in a cell", "check the data")
        m = M.metrics_from_outputs(out.samples.take(rows), **kw)
        if out.ood_id_conf is not None:
            m["ood_auroc"] = M.ood_auroc(out.ood_id_conf, out.samples.conf[rows])
        return m

    if not out.group_names:
        return _with_id_acc(out, metrics(out.rows(), "the cell")), None
    groups = {g: metrics(out.rows(g), g) for g in out.group_names}
    summary = summary_groups or list(out.group_names)
    headline = average_metrics([groups[g] for g in summary])
    headline["n"] = int(sum(groups[g]["n"] for g in summary))
    headline.update(grouped_intervals(out, summary, headline, n_bins=n_bins,
                                      n_bootstrap=n_bootstrap, seed=seed, alpha=alpha))
    return _with_id_acc(out, headline), groups


def grouped_intervals(out: CellOutputs, summary: list[str], headline: dict, *, n_bins: int,
                      n_bootstrap: int, seed: int, alpha: float) -> dict[str, float]:
    """The headline intervals of a grouped cell: the bootstrap over its base images (every
    row its own when the cell has none), the mean over ``summary``'s groups per replicate."""
    index = [out.group_names.index(g) for g in summary]
    rows = out.rows()
    rows = rows[np.isin(out.group[rows], index)]
    compact = np.full(len(out.group_names), -1, dtype=np.int64)
    compact[index] = np.arange(len(index))
    clusters = Clusters.of(None if out.base is None else out.base[rows], rows.size)
    return headline_intervals(SampleValues.of(out.samples.take(rows)), compact[out.group[rows]],
                              len(index), clusters, headline, n_bins=n_bins,
                              n_bootstrap=n_bootstrap, seed=seed, alpha=alpha)


def _with_id_acc(out: CellOutputs, headline: dict) -> dict:
    """The headline in the records' metric order, with ``id_acc1`` (%) when paired."""
    if out.ood_id_correct is not None and out.ood_id_correct.size:
        headline["id_acc1"] = 100.0 * float(np.count_nonzero(out.ood_id_correct)) / \
            out.ood_id_correct.size
    order = [k for k in M.RECORD_METRIC_INFO if k in headline]
    return {k: headline[k] for k in [*order, *(k for k in headline if k not in order)]}


def average_metrics(cells: list[dict]) -> dict:
    """Unweighted mean of each metric over cells (the CIFAR-10-C convention: mean over
    corruptions x severities); interval keys are dropped because a mean of intervals is not one."""
    keys = [k for k in cells[0]
            if not k.endswith(("_ci_low", "_ci_high")) and k not in ("n", "num_classes")]
    out = {"num_classes": cells[0].get("num_classes")}
    for k in keys:
        vals = [c[k] for c in cells if c.get(k) is not None]
        out[k] = float(np.nanmean(vals)) if vals and not all(np.isnan(vals)) else float("nan")
    return out
