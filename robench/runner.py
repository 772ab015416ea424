"""The runner: crosses a suite's models with its datasets and writes one record per cell.

    for each backbone (loaded once, lazily):
        for each dataset: image features (cached)
            for each model on that backbone: head -> logits -> metrics -> record

Cells whose record already exists with the same cell key are skipped (resume after a crash;
``force=true`` redoes them), and a backbone whose cells are all done is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

import robench
import robench.metrics as M  # noqa: N812
from robench.data import family_loader
from robench.data.base import ImageSource
from robench.errors import RobenchError, unknown
from robench.features import FeatureSet, extract_features, sample_names
from robench.models import METHODS
from robench.models.backbone import Backbone, load_backbone, resolve_device
from robench.models.backbone import kernel_family as device_kernel_family
from robench.models.heads import LinearHead
from robench.progress import echo
from robench.registry import (
    DatasetSpec,
    ModelSpec,
    dataset_root,
    resolve_dataset,
    resolve_model,
    template_set,
)
from robench.results import read_record, record_path, write_record

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1


def load_source(name: str, spec: DatasetSpec, cfg: DictConfig,
                source_of: object = None) -> ImageSource:
    """Read a dataset's index (no pixels): fails here, before any model is loaded."""
    root = dataset_root(name, spec, cfg.data_root, OmegaConf.to_container(cfg.data))
    source = family_loader(spec.family)(
        root, name=name, cache_dir=cfg.cache_dir, source_of=source_of, progress=cfg.progress,
        workers=max(1, cfg.model.num_workers), **spec.options)
    if spec.n_expected is not None and len(source) != spec.n_expected:
        msg = f"{name}: found {len(source)} samples under {root}, expected {spec.n_expected}"
        if cfg.strict:
            raise RobenchError(msg, "check that the dataset is complete (robench data verify)")
        log.warning(msg)
    return source


@dataclass
class MethodContext:
    """What a method needs to build its head: the backbone, caches, and other datasets' features
    (e.g. a training split)."""

    backbone: Backbone
    cfg: DictConfig
    spec: ModelSpec
    runner: Runner

    @property
    def cache_dir(self) -> str:
        return self.cfg.cache_dir

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress)

    def template_set(self, source: ImageSource) -> str:
        return self.runner.dataset_specs[source.name].templates

    def templates(self, source: ImageSource) -> list[str]:
        return template_set(self.template_set(source))

    def features(self, dataset: str) -> tuple[ImageSource, FeatureSet]:
        return self.runner.source_and_features(self.backbone, dataset)


@dataclass
class Runner:
    cfg: DictConfig
    models: dict[str, ModelSpec] = field(default_factory=dict)
    _prepared: dict[str, ModelSpec] = field(default_factory=dict)
    dataset_specs: dict[str, DatasetSpec] = field(default_factory=dict)
    sources: dict[str, ImageSource] = field(default_factory=dict)
    _features: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)
    _evaluated: set[str] = field(default_factory=set)  # the suite's models (not helpers)
    # in-memory backbones by (arch, pretrained), used instead of loading one (robench.CustomModel)
    backbones: dict[tuple[str, str | None], Backbone] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for item in self.cfg.models:
            name, spec = resolve_model(_plain(item))
            if spec.method not in METHODS:
                raise unknown("method", spec.method, METHODS)
            method = import_module(METHODS[spec.method])
            # a declaration may stand for several models (e.g. one WiSE-FT model per alpha)
            expanded = method.expand(name, spec) if hasattr(method, "expand") else [(name, spec)]
            for n, s in expanded:
                self.models[n] = s
        for item in self.cfg.datasets:
            name, spec = resolve_dataset(_plain(item))
            self.dataset_specs[name] = spec
        self._evaluated = set(self.models)
        if self.cfg.id_dataset and self.cfg.id_dataset not in self.dataset_specs:
            raise unknown("id_dataset", self.cfg.id_dataset, self.dataset_specs,
                          fix="id_dataset must be one of the suite's datasets")

    # -- data ---------------------------------------------------------------------------------
    def source(self, name: str) -> ImageSource:
        if name not in self.sources:
            if name not in self.dataset_specs:  # a method's training split outside the suite
                _, self.dataset_specs[name] = resolve_dataset(name)
            self.sources[name] = load_source(name, self.dataset_specs[name], self.cfg,
                                             source_of=self.source)
        return self.sources[name]

    def source_and_features(self, backbone: Backbone, name: str) -> tuple[ImageSource, FeatureSet]:
        source = self.source(name)
        key = (backbone.id(), name)
        if key not in self._features:
            self._features[key] = extract_features(
                backbone, source, self.cfg.cache_dir, batch_size=self.cfg.model.batch_size,
                num_workers=self.cfg.model.num_workers, progress=self.cfg.progress,
                strict=self.cfg.strict)
        return source, self._features[key]

    # -- models -------------------------------------------------------------------------------
    def declared(self, name: str) -> ModelSpec:
        """A model's spec as declared (suite or registry), even if not evaluated in this suite."""
        if name not in self.models:
            _, self.models[name] = resolve_model(name)
        return self.models[name]

    def prepared(self, name: str) -> ModelSpec:
        """The spec to load: methods that change the backbone (fine-tuning, WiSE-FT) train or
        reuse their checkpoint here and point the spec at it."""
        if name not in self._prepared:
            spec = self.declared(name)
            method = import_module(METHODS[spec.method])
            self._prepared[name] = (method.prepare(self, name, spec)
                                    if hasattr(method, "prepare") else spec)
        return self._prepared[name]

    def templates_for(self, dataset: str) -> list[str]:
        self.source(dataset)
        return template_set(self.dataset_specs[dataset].templates)

    # -- cells --------------------------------------------------------------------------------
    def cell_key(self, model: str, dataset: str) -> str:
        source = self.source(dataset)
        ident = {
            "protocol": PROTOCOL_VERSION, "model": model, "spec": asdict(self.models[model]),
            "dataset": dataset, "dataset_spec": asdict(self.dataset_specs[dataset]),
            "manifest": source.manifest_hash, "metrics": OmegaConf.to_container(self.cfg.metrics),
            "seed": self.cfg.seed, "precision": self.cfg.model.precision,
            "id_dataset": self.cfg.id_dataset,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def is_done(self, model: str, dataset: str) -> bool:
        path = record_path(self.cfg.results_dir, self.cfg.name, model, dataset)
        if self.cfg.force or not path.is_file() or not path.with_suffix(".npz").is_file():
            return False
        try:
            return read_record(path).get("cell_key") == self.cell_key(model, dataset)
        except RobenchError:
            return False

    def run(self) -> list[Path]:
        """Run every pending cell; return the record paths of all cells of the suite."""
        resolve_device(self.cfg.device)  # an unknown or absent device fails before any data
        for name in self.dataset_specs:  # a wrong root fails before any model is loaded
            self.source(name)
        datasets = list(self.dataset_specs)
        if self.cfg.id_dataset:  # the ID cell first: shifted cells need its confidences
            datasets.sort(key=lambda d: d != self.cfg.id_dataset)
        evaluated = [m for m in self.models if m in self._evaluated]
        paths = [record_path(self.cfg.results_dir, self.cfg.name, m, d)
                 for m in evaluated for d in datasets]
        pending = {(m, d) for m in evaluated for d in datasets if not self.is_done(m, d)}
        total, done = len(paths), len(paths) - len(pending)
        if done:
            echo(f"{done} of {total} cell(s) already done (force=true redoes them)")
        groups: dict[tuple, list[str]] = {}
        for name in evaluated:
            if any((name, d) in pending for d in datasets):
                spec = self.prepared(name)  # trains fine-tuned checkpoints if needed
                groups.setdefault((spec.arch, spec.pretrained), []).append(name)
        t0 = time.time()
        for (arch, pretrained), names in groups.items():
            backbone = self.backbones.get((arch, pretrained)) or load_backbone(
                arch, pretrained, self.cfg.device, self.cfg.model.precision,
                allow_download=self.cfg.allow_download, seed=self.cfg.seed)
            heads: dict[tuple[str, tuple], LinearHead] = {}
            for d in datasets:
                todo = [m for m in names if (m, d) in pending]
                if not todo:
                    continue
                source, feats = self.source_and_features(backbone, d)
                for m in todo:
                    ctx = MethodContext(backbone, self.cfg, self.prepared(m), self)
                    hk = (m, tuple(source.classnames), self.dataset_specs[d].templates)
                    if hk not in heads:
                        method = import_module(METHODS[self.models[m].method])
                        heads[hk] = method.build(ctx, source)
                    self.score_cell(m, d, backbone, heads[hk], source, feats)
                    done += 1
                    rec = read_record(record_path(self.cfg.results_dir, self.cfg.name, m, d))
                    mt = rec["metrics"]
                    echo(f"[{done}/{total}] {m} x {d}: acc1={_fmt(mt['acc1'])} "
                         f"ece={_fmt(mt['ece'], 4)} auroc={_fmt(mt['auroc'], 4)} "
                         f"({time.time() - t0:.0f}s)")
        return paths

    def score_cell(self, model: str, dataset: str, backbone: Backbone, head: LinearHead,
                   source: ImageSource, feats: FeatureSet) -> None:
        """Logits -> metrics (per group and headline) -> record + per-sample probabilities."""
        logits, labels, scored = restrict(head.logits(feats.features), source)
        valid = np.ones(len(labels), dtype=bool)
        valid[feats.bad] = False
        mc = self.cfg.metrics
        id_conf = self.id_confidence(model, dataset)

        def cell_metrics(rows: np.ndarray) -> dict:
            rows = rows[valid[rows]]
            if len(rows) == 0:
                raise RobenchError(f"{dataset}: no decodable image in a cell", "check the data")
            out = M.compute_all(logits[rows], labels[rows], n_bins=mc.n_bins,
                                n_bootstrap=mc.bootstrap, seed=self.cfg.seed, alpha=mc.alpha)
            if id_conf is not None:
                conf = M.softmax(logits[rows]).max(axis=1)
                out["ood_auroc"] = M.ood_auroc(id_conf, conf)
            return out

        group_metrics = None
        if source.groups:
            group_metrics = {g: cell_metrics(idx) for g, idx in source.groups.items()}
            summary = source.summary_groups or list(source.groups)
            headline = average_metrics([group_metrics[g] for g in summary])
            headline["n"] = int(sum(group_metrics[g]["n"] for g in summary))
        else:
            headline = cell_metrics(np.arange(len(labels)))
        spec = self.models[model]
        record = {
            "suite": self.cfg.name, "model": model, "dataset": dataset,
            "cell_key": self.cell_key(model, dataset),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": headline,
            "groups": group_metrics,
            "protocol": {
                "method": spec.method, "confidence": "msp", "ece_bins": mc.n_bins,
                "bootstrap": mc.bootstrap, "alpha": mc.alpha,
                "scored_classes": scored, "n_classes_scored": logits.shape[1],
                "summary": "mean over groups " + ",".join(source.summary_groups or [])
                if source.groups else "all samples",
                "id_dataset": self.cfg.id_dataset or None,
                "auroc": "misclassification detection: MSP separating correct from wrong",
                "ood_auroc": "ID vs this set, score=-MSP, shifted positive" if id_conf is not None
                else None,
                **head.info,
            },
            "data": {
                "root": source.info.get("root"), "manifest_hash": source.manifest_hash,
                "n": len(source), "n_bad": len(feats.bad),
                "bad_samples": sample_names(source, feats.bad, limit=100),
                "feature_key": feats.key,
            },
            "provenance": provenance(backbone, self.cfg, spec),
        }
        path = record_path(self.cfg.results_dir, self.cfg.name, model, dataset)
        write_record(path, record, probabilities(logits), labels)

    def id_confidence(self, model: str, dataset: str) -> np.ndarray | None:
        if not self.cfg.id_dataset or dataset == self.cfg.id_dataset:
            return None
        path = record_path(self.cfg.results_dir, self.cfg.name, model, self.cfg.id_dataset)
        with np.load(path.with_suffix(".npz")) as z:
            return z["probs"].astype(np.float32).max(axis=1)


def probabilities(logits: np.ndarray, block: int = 8192) -> np.ndarray:
    """float16 softmax, a block of rows at a time (float64 for 100k x 1000 would be 800 MB)."""
    out = np.empty(logits.shape, dtype=np.float16)
    for s in range(0, len(logits), block):
        out[s:s + block] = M.softmax(logits[s:s + block])
    return out


def restrict(logits: np.ndarray, source: ImageSource) -> tuple[np.ndarray, np.ndarray, object]:
    """Restrict logits to the source's scored class sub-list (ImageNet-R/-A: 200 of 1000) and map
    labels to positions in that sub-list."""
    if source.class_subset is None:
        return logits, source.labels, "all"
    subset = np.asarray(source.class_subset)
    position = {int(c): i for i, c in enumerate(subset)}
    labels = np.asarray([position[int(y)] for y in source.labels], dtype=np.int64)
    return logits[:, subset], labels, [int(c) for c in subset]


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


def provenance(backbone: Backbone, cfg: DictConfig, spec: ModelSpec) -> dict:
    import open_clip
    import torch

    return {
        "robench": robench.__version__, "torch": torch.__version__,
        "open_clip": open_clip.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "git_sha": git_sha(),
        "device": backbone.device, "dtype": backbone.precision, "kernels": kernel_family(backbone),
        "batch_size": cfg.model.batch_size, "seed": cfg.seed,
        "arch": spec.arch, "pretrained": spec.pretrained,
        "weights_hash": backbone.weights_hash, "logit_scale": backbone.logit_scale,
        "preprocess": backbone.preprocess_id,
    }


def kernel_family(backbone: Backbone) -> str:
    """The backbone's device's kernel family (see :func:`robench.models.backbone.kernel_family`)."""
    return device_kernel_family(backbone.device)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(robench.__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plain(item: object) -> object:
    return OmegaConf.to_container(item) if isinstance(item, DictConfig) else item


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
