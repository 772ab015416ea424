"""The runner: crosses a suite's models with its datasets and writes one record per cell.

    for each backbone (loaded once, lazily):
        for each dataset: image features (cached)
            for each model on that backbone: head -> logits -> metrics -> record

Cells whose record already exists with the same cell key are skipped (resume after a crash;
``force=true`` redoes them), and a backbone whose cells are all done is never loaded.

Under ``torchrun`` (several ranks, :mod:`robench.distributed`) every rank walks the same groups
in the same order: the features a group's cells read are extracted together, sharded by sample
index (:mod:`robench.feature_shards`); fine-tuning trains with DistributedDataParallel; then each
cell is scored by the one rank that owns it (:meth:`Runner.owners`), so every record is written
once, and the ranks meet at a barrier before anyone reads the records back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

import robench
from robench import distributed
from robench.config import pair_id_dataset
from robench.data import dataset_options, load_dataset
from robench.data.base import ImageSource, LoadSettings
from robench.errors import RobenchError
from robench.features import FeatureSet, describe, extract_features, sample_names
from robench.io import entry_lock, sweep_stale
from robench.methods import make_method
from robench.methods.base import HeadContext, Method, Settings
from robench.metrics import ADAPTIVE_BINS
from robench.models.arch_configs import register_model_configs
from robench.models.heads import LinearHead
from robench.models.weights import derived_info, weights_identity
from robench.progress import echo
from robench.registry import (
    DatasetSpec,
    ModelSpec,
    dataset_root,
    resolve_dataset,
    resolve_model,
    spec_identity,
    template_set,
)
from robench.results import portable_record, read_record, record_path, write_record
from robench.scoring import (
    OUTPUTS_VERSION,
    CellOutputs,
    cell_metrics,
    cell_outputs,
    id_confidence,
)

if TYPE_CHECKING:  # torch and open_clip are imported only when a model is loaded
    from robench.models.backbone import Backbone

log = logging.getLogger(__name__)
# 2: exact per-sample outputs, ood_auroc over the same classes; 3: -C intervals over base images,
# bias-shifted bootstrap intervals, id_acc1
PROTOCOL_VERSION = 3


def load_source(name: str, spec: DatasetSpec, cfg: DictConfig,
                source_of: object = None) -> ImageSource:
    """Read a dataset's index (no pixels): fails here, before any model is loaded."""
    root = dataset_root(name, spec, cfg.data_root, OmegaConf.to_container(cfg.data))
    settings = LoadSettings(cache_dir=cfg.cache_dir, progress=cfg.progress,
                            workers=max(1, cfg.model.num_workers), source_of=source_of)
    source = load_dataset(spec.family, root, name, dataset_options(name, spec), settings)
    if spec.n_expected is not None and len(source) != spec.n_expected:
        msg = f"{name}: found {len(source)} samples under {root}, expected {spec.n_expected}"
        if cfg.strict:
            raise RobenchError(msg, "check that the dataset is complete (robench data verify)")
        log.warning(msg)
    return source


@dataclass
class Runner:
    """Runs a suite; to the methods it is their :class:`robench.methods.base.Bench`."""

    cfg: DictConfig
    models: dict[str, ModelSpec] = field(default_factory=dict)
    methods: dict[str, Method] = field(default_factory=dict)  # options parsed, per model
    _prepared: dict[str, ModelSpec] = field(default_factory=dict)
    dataset_specs: dict[str, DatasetSpec] = field(default_factory=dict)
    sources: dict[str, ImageSource] = field(default_factory=dict)
    _features: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)
    _evaluated: set[str] = field(default_factory=set)  # the suite's models (not helpers)
    evaluated_datasets: list[str] = field(default_factory=list)  # the suite's datasets
    _weight_ids: dict[str, dict] = field(default_factory=dict)
    # in-memory backbones by (arch, pretrained), used instead of loading one (robench.CustomModel)
    backbones: dict[tuple[str, str | None], Backbone] = field(default_factory=dict)
    world: distributed.World = field(default_factory=distributed.current)
    _device_started: bool = False  # start_device ran (the device resolved, ranks met)

    def __post_init__(self) -> None:
        register_model_configs(self.cfg.get("model_configs") or [])  # the suite's own archs
        for item in self.cfg.models:
            name, spec = resolve_model(_plain(item))
            method = make_method(spec.method, spec.options, name)  # options checked here
            # a declaration may stand for several models (e.g. one WiSE-FT model per alpha)
            for n, declared in method.expand(name, spec.options):
                self.models[n] = replace(spec, options=declared)
                self.methods[n] = method if declared == dict(spec.options) else \
                    make_method(spec.method, declared, n)
        for item in self.cfg.datasets:
            name, spec = resolve_dataset(_plain(item))
            dataset_options(name, spec)  # options checked here, before any data is read
            self.dataset_specs[name] = spec
        self._evaluated = set(self.models)
        self.evaluated_datasets = list(self.dataset_specs)  # not helpers loaded later
        note = pair_id_dataset(self.cfg, list(self.dataset_specs))
        if note and distributed.env_world().is_lead:  # said once, not by every rank
            echo(note)  # a subset of the suite leaves its ID set out: no ood_auroc

    # -- data ---------------------------------------------------------------------------------
    def source(self, name: str) -> ImageSource:
        if name not in self.sources:
            if name not in self.dataset_specs:  # a method's training split outside the suite
                _, self.dataset_specs[name] = resolve_dataset(name)
            self.sources[name] = load_source(name, self.dataset_specs[name], self.cfg,
                                             source_of=self.source)
        return self.sources[name]

    @property
    def settings(self) -> Settings:
        c = self.cfg
        return Settings(cache_dir=c.cache_dir, device=c.device, seed=int(c.seed),
                        progress=bool(c.progress), strict=bool(c.strict),
                        batch_size=int(c.model.batch_size), num_workers=int(c.model.num_workers),
                        allow_download=bool(c.allow_download),
                        features_dtype=str(c.model.features_dtype))

    def features(self, backbone: Backbone, name: str) -> tuple[ImageSource, FeatureSet]:
        return self.source_and_features(backbone, name)

    def template_set_of(self, dataset: str) -> str:
        self.source(dataset)  # registers a dataset outside the suite
        return self.dataset_specs[dataset].templates

    def source_and_features(self, backbone: Backbone, name: str, collective: bool = False
                            ) -> tuple[ImageSource, FeatureSet]:
        """A dataset's features under ``backbone``; ``collective``: every rank calls this
        together and the extraction is sharded over them (else this rank extracts alone)."""
        source = self.source(name)
        key = (backbone.id(), name)
        if key not in self._features:
            feats = extract_features(
                backbone, source, self.cfg.cache_dir, batch_size=self.cfg.model.batch_size,
                num_workers=self.cfg.model.num_workers, progress=self.cfg.progress,
                strict=self.cfg.strict, dtype=self.cfg.model.features_dtype,
                world=self.world if collective else None)
            if self.cfg.strict and feats.bad:  # cached features remember the bad images
                raise RobenchError(
                    f"{name}: cannot decode image(s) {describe(source, feats.bad)}",
                    "replace the files, or run with strict=false to count and skip them")
            self._features[key] = feats
        return source, self._features[key]

    # -- models -------------------------------------------------------------------------------
    def declared(self, name: str) -> ModelSpec:
        """A model's spec as declared (suite or registry), even if not evaluated in this suite."""
        if name not in self.models:
            _, self.models[name] = resolve_model(name)
        return self.models[name]

    def method_of(self, name: str) -> Method:
        """A model's method, its options parsed (a model outside the suite: from the registry)."""
        if name not in self.methods:
            spec = self.declared(name)
            self.methods[name] = make_method(spec.method, spec.options, name)
        return self.methods[name]

    def prepared(self, name: str) -> ModelSpec:
        """The spec to load: methods that change the backbone (fine-tuning, WiSE-FT) train or
        reuse their checkpoint here and point the spec at it."""
        if name not in self._prepared:
            self._prepared[name] = self.method_of(name).prepare(self, name, self.declared(name))
        return self._prepared[name]

    def templates_for(self, dataset: str) -> list[str]:
        self.source(dataset)
        return template_set(self.dataset_specs[dataset].templates)

    # -- cells --------------------------------------------------------------------------------
    def cell_key(self, model: str, dataset: str) -> str:
        source = self.source(dataset)
        ident = {
            "protocol": PROTOCOL_VERSION, "model": model, "spec": spec_identity(self.models[model]),
            "dataset": dataset, "dataset_spec": asdict(self.dataset_specs[dataset]),
            "manifest": source.manifest_hash, "metrics": OmegaConf.to_container(self.cfg.metrics),
            "seed": self.cfg.seed, "precision": self.cfg.model.precision,
            "features_dtype": self.cfg.model.features_dtype,
            # not `outputs`: it changes what is stored, not what is computed (is_done redoes
            # a cell whose stored outputs lack the logits a run asks for)
            "id_dataset": self.cfg.id_dataset,
            "id_manifest": self.source(self.cfg.id_dataset).manifest_hash
            if self.cfg.id_dataset else None,
            # not `strict`: a cell scored without skipping any image is the same under both;
            # one that skipped images is not done for a strict run (is_done reads its n_bad)
            "weights": self._weights_identity(model),
            # what a trained head or checkpoint was computed from, known before it is loaded:
            # the files of each dataset it learns from, and the models it is built from
            "training_data": {role: self.source(d).manifest_hash
                              for role, d in self.data_roles(model)},
            "depends_on": {m: {"spec": spec_identity(self.declared(m)),
                               "weights": self._weights_identity(m)}
                           for m in self.model_dependencies(model)},
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()
                              ).hexdigest()[:32]

    def model_dependencies(self, name: str) -> list[str]:
        """The models ``name`` is built from (the fine-tuned model of a WiSE-FT mix), deepest
        last."""
        return [d for m in self.method_of(name).dependencies()
                for d in (m, *self.model_dependencies(m))]

    def _weights_identity(self, model: str) -> dict:
        if model not in self._weight_ids:
            spec = self.declared(model)
            self._weight_ids[model] = weights_identity(spec.arch, spec.pretrained,
                                                       self.cfg.cache_dir)
        return self._weight_ids[model]

    def is_done(self, model: str, dataset: str) -> bool:
        path = record_path(self.cfg.results_dir, self.cfg.name, model, dataset)
        if self.cfg.force or not path.is_file() or not path.with_suffix(".npz").is_file():
            return False
        try:
            rec = read_record(path)  # checksum, outputs digest, metrics against the outputs
        except RobenchError as e:
            log.warning("%s; its cell is recomputed", e.problem)
            return False
        if self.cfg.strict and rec.get("data", {}).get("n_bad"):
            return False  # scored without its corrupt images: strict=true must fail on them
        if self.cfg.outputs == "logits" and not (rec.get("outputs") or {}).get("logits"):
            return False  # the cell's outputs lack the full logits this run asks for
        return rec.get("cell_key") == self.cell_key(model, dataset)

    def data_roles(self, name: str) -> list[tuple[str, str]]:
        """(option, dataset) pairs a model trains, selects or calibrates on, through wrapped
        bases (temperature scaling) and the models it is built from (``<model>.<option>``)."""
        method = self.method_of(name)
        return [*method.data_roles(),
                *((f"{dep}.{role}", d) for dep in method.dependencies()
                  for role, d in self.data_roles(dep))]

    def check_training_data(self, models: list[str]) -> None:
        """Refuse a method that trains, selects or calibrates on an evaluated dataset (by name
        or by the same files): its numbers there would be in-sample."""
        if self.cfg.allow_train_on_eval:
            return
        evaluated = {self.source(d).manifest_hash: d for d in self.evaluated_datasets}
        for m in models:
            for role, d in self.data_roles(m):
                same = d if d in self.evaluated_datasets else \
                    evaluated.get(self.source(d).manifest_hash)
                if same:
                    what = "is" if same == d else f"has the same files as {same}, which is"
                    raise RobenchError(
                        f"model {m}: {role}={d} {what} one of the datasets this suite "
                        "evaluates, so its numbers there would be measured on training data",
                        f"train on a separate split (e.g. imagenet-train, cifar10-subset-probe) "
                        f"or drop {same} from datasets; allow_train_on_eval=true overrides this "
                        "deliberately")

    def feature_datasets(self, name: str) -> list[str]:
        """Datasets whose features ``name``'s head reads under its own backbone (a probe's
        train / val splits, a calibration split), not those a fine-tuning method trains on
        from images or the roles of a WiSE-FT mix's fine-tuned model."""
        return self.method_of(name).feature_datasets()

    def owners(self, pending: set[tuple[str, str]], evaluated: list[str],
               datasets: list[str]) -> dict[tuple[str, str], int]:
        """The rank that scores each pending cell. Cells sharing a head (same model, label
        space and templates) go to one rank, so a head is built once; heads are dealt to the
        ranks by :func:`robench.distributed.balance` on their number of samples."""
        units: dict[tuple, list[tuple[str, str]]] = {}
        for m in evaluated:
            for d in datasets:
                if (m, d) in pending:
                    source = self.source(d)
                    hk = (m, tuple(source.classnames), self.dataset_specs[d].templates)
                    units.setdefault(hk, []).append((m, d))
        costs = [sum(len(self.source(d)) for _, d in cells) for cells in units.values()]
        ranks = distributed.balance(costs, self.world.size)
        return {cell: r for cells, r in zip(units.values(), ranks, strict=True)
                for cell in cells}

    def run(self) -> list[Path]:
        """Run every pending cell; return the record paths of all cells of the suite."""
        if distributed.env_world().distributed or self.cfg.device not in ("auto", "cpu"):
            self.start_device()  # an unknown or absent device fails first; ranks meet here
        cache = Path(self.cfg.cache_dir).expanduser()
        sweep_stale(*(cache / d for d in ("features", "text", "artifacts", "content-index")),
                    Path(self.cfg.results_dir) / self.cfg.name)
        evaluated = [m for m in self.models if m in self._evaluated]
        datasets = list(self.evaluated_datasets)
        paths = [record_path(self.cfg.results_dir, self.cfg.name, m, d)
                 for m in evaluated for d in datasets]
        # Missing weights fail before any data is hashed. That check needs open_clip (its tag
        # registry), which a run whose records are all on disk (likely all done) leaves
        # unimported until a cell turns out to be pending.
        checked = self.cfg.force or not all(p.is_file() for p in paths)
        if checked:
            self.check_weights(evaluated)
        for name in self.evaluated_datasets:  # a wrong root fails before any model is loaded
            self.source(name)
        self.check_training_data(evaluated)
        pending = {(m, d) for m in evaluated for d in datasets if not self.is_done(m, d)}
        if pending:  # only now torch and open_clip: a run with every cell done needs neither
            self.start_device()
            if not checked:
                to_run = {m for m, _ in pending}
                self.check_weights([m for m in evaluated if m in to_run])
        self.world.barrier()  # every rank has seen the records before any is written
        total, done = len(paths), len(paths) - len(pending)
        if done and self.world.is_lead:
            echo(f"{done} of {total} cell(s) already done (force=true redoes them)")
        groups: dict[tuple, list[str]] = {}
        for name in evaluated:
            if any((name, d) in pending for d in datasets):
                spec = self.prepared(name)  # trains fine-tuned checkpoints if needed
                # a declared preprocess block is part of what is loaded
                groups.setdefault((spec.arch, spec.pretrained, spec.preprocess), []).append(name)
        owner = self.owners(pending, evaluated, datasets)
        mine = [c for c in pending if owner[c] == self.world.rank]
        who = f"rank {self.world.rank}: " if self.world.distributed else ""
        t0 = time.time()
        for (arch, pretrained, preprocess), names in groups.items():
            from robench.models.backbone import load_backbone

            backbone = self.backbones.get((arch, pretrained)) or load_backbone(
                arch, pretrained, self.cfg.device, self.cfg.model.precision,
                allow_download=self.cfg.allow_download, seed=self.cfg.seed,
                preprocess=preprocess)
            if self.world.distributed:  # extract together what this group's cells will read
                for d in self.group_datasets(names, datasets, pending):
                    self.source_and_features(backbone, d, collective=True)
            heads: dict[tuple[str, tuple], LinearHead] = {}
            for d in datasets:
                todo = [m for m in names if (m, d) in pending and owner[(m, d)] ==
                        self.world.rank]
                if not todo:
                    continue
                source, feats = self.source_and_features(backbone, d)
                for m in todo:
                    with self.cell_lock(m, d):
                        done += 1
                        if not self.cfg.force and self.is_done(m, d):
                            echo(f"{who}[{done}/{total}] {m} x {d}: scored meanwhile by another "
                                 "run on this cache")
                            continue
                        ctx = HeadContext(backbone, self.prepared(m), self)
                        # the scored sub-list is part of the key: a zero-shot head for
                        # ImageNet-R holds R's 200 columns only and cannot serve ImageNet-A
                        hk = (m, tuple(source.classnames), tuple(source.class_subset or ()),
                              self.dataset_specs[d].templates)
                        if hk not in heads:
                            heads[hk] = self.method_of(m).build(ctx, source)
                        mt = self.score_cell(m, d, backbone, heads[hk], source, feats)
                    echo(f"{who}[{done}/{total}] {m} x {d}: acc1={_fmt(mt['acc1'])} "
                         f"acc5={_fmt(mt.get('acc5'))} "
                         f"ece={_fmt(mt['ece'], 4)} auroc={_fmt(mt['auroc'], 4)} "
                         f"({time.time() - t0:.0f}s)")
        if self.world.distributed:
            echo(f"{who}{len(mine)} cell(s) scored; waiting for the other ranks")
        self.world.barrier()  # every record is written before anyone reads them back
        if self.world.is_lead:  # one writer of the suite's analysis file
            self.analyze()
        self.world.barrier()
        return paths

    def trained_world_size(self, model: str) -> int | None:
        """The ranks that trained ``model``'s network (its checkpoint says; a checkpoint of an
        older robench: this run's), or None for a method that trains no network."""
        if not self.method_of(model).changes_backbone:
            return None
        info = derived_info(self.prepared(model).pretrained)
        return int(info.get("train_world_size", self.world.size))

    def cell_lock(self, model: str, dataset: str) -> contextlib.AbstractContextManager:
        """A lock per cell, beside the records it guards (``<suite>/.locks/``, hidden, never
        read as a record; the results folder is written anyway, a finished cache may be
        read-only): two runs of one suite score each cell once, the second waits and reads."""
        path = record_path(self.cfg.results_dir, self.cfg.name, model, dataset)
        key = hashlib.sha256(f"{model}\0{dataset}".encode()).hexdigest()[:32]
        return entry_lock(path.parent.parent / ".locks" / key, f"the cell {model} x {dataset}")

    def check_weights(self, models: list[str]) -> None:
        """The architecture exists and the weights are at hand, for each of ``models``, in
        order (those given as in-memory backbones need nothing)."""
        from robench.models.backbone import check_loadable

        for m in models:
            spec = self.declared(m)
            if (spec.arch, spec.pretrained) not in self.backbones:
                check_loadable(spec.arch, spec.pretrained, self.cfg.allow_download)

    def start_device(self) -> None:
        """Resolve the device (an unknown or absent one is an error) and, under a launcher, join
        the process group; once per run."""
        if self._device_started:
            return
        from robench.models.backbone import resolve_device

        device = resolve_device(self.cfg.device)
        self.world = distributed.init(device)  # a process group only under a launcher
        self.cfg.device = distributed.rank_device(device, self.world) \
            if self.world.distributed else device
        self._device_started = True

    def analyze(self) -> None:
        """Cross-cell analyses of the suite's records (paired comparisons, effective
        robustness, mCE, reliability bins) into ``<results_dir>/<suite>/analysis.json``."""
        from robench.analysis import AnalysisSettings, analyze, summary_line

        folder = Path(self.cfg.results_dir) / self.cfg.name
        for path, doc in analyze(folder, AnalysisSettings.of(self.cfg.get("analysis")),
                                 strict=False):  # a subset run lacks some named models
            echo(summary_line(path, doc))

    def group_datasets(self, names: list[str], datasets: list[str],
                       pending: set[tuple[str, str]]) -> list[str]:
        """The datasets whose features the pending cells of one backbone group read: the
        evaluated ones, the ID set of a pairing, the heads' training / calibration splits;
        the same list, in the same order, on every rank."""
        need: list[str] = []
        for d in datasets:
            todo = [m for m in names if (m, d) in pending]
            if not todo:
                continue
            need.append(d)
            if self.cfg.id_dataset and d != self.cfg.id_dataset:
                need.append(self.cfg.id_dataset)
            for m in todo:
                need += self.feature_datasets(m)
        return list(dict.fromkeys(need))

    def score_cell(self, model: str, dataset: str, backbone: Backbone, head: LinearHead,
                   source: ImageSource, feats: FeatureSet) -> dict:
        """Features -> logits (streamed in blocks) -> exact per-sample outputs -> metrics (per
        group and headline) -> outputs file + record; returns the headline metrics."""
        mc = self.cfg.metrics
        out = cell_outputs(head, feats, source, keep_logits=self.cfg.outputs == "logits")
        pairing = self.ood_pairing(dataset, head, backbone, out.scored_classes)
        if pairing is not None:
            out.ood_id_conf, out.ood_id_correct = pairing
        headline, group_metrics = cell_metrics(
            out, source.summary_groups, n_bins=mc.n_bins, n_bootstrap=mc.bootstrap,
            seed=self.cfg.seed, alpha=mc.alpha, adaptive_bins=mc.adaptive_bins)
        spec = self.models[model]
        scored = "all" if out.scored_classes is None else [int(c) for c in out.scored_classes]
        record = {
            "suite": self.cfg.name, "model": model, "dataset": dataset,
            "cell_key": self.cell_key(model, dataset),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": headline,
            "groups": group_metrics,
            "protocol": {
                "version": PROTOCOL_VERSION, "method": spec.method, "confidence": "msp",
                "ece_bins": mc.n_bins, "bootstrap": mc.bootstrap,
                "adaptive_bins": mc.adaptive_bins, "ece_adaptive": ADAPTIVE_BINS[mc.adaptive_bins],
                "interval_level": 1 - mc.alpha, "seed": self.cfg.seed,
                "scored_classes": scored, "n_classes_scored": out.samples.num_classes,
                "summary": "mean over groups " + ",".join(source.summary_groups or [])
                if source.groups else "all samples",
                "summary_groups": list(source.summary_groups or []) if source.groups else None,
                "intervals": interval_protocol(out),
                "id_dataset": self.cfg.id_dataset or None,
                "auroc": "misclassification detection: MSP separating correct from wrong",
                "ood_auroc": "ID vs this set over the same scored classes, score=-MSP, shifted "
                             "positive" if pairing is not None else None,
                **{k: head.info[k] for k in ("template_set", "n_templates") if k in head.info},
            },
            # the method's own knobs and what its head reports (WiSE-FT's mixing alpha, a
            # fitted temperature, a probe's C), apart from the protocol's fields
            "method": {"name": spec.method, "options": dict(spec.options), "head": head.info},
            "data": {
                "root": source.info.get("root"), "manifest_hash": source.manifest_hash,
                "n": len(source), "n_bad": len(feats.bad),
                "bad_samples": sample_names(source, feats.bad, limit=100),
                "feature_key": feats.key, "features_dtype": str(feats.features.dtype),
                # a -C set robench generated says so (protocol, resize, base); null otherwise
                "generated": source.info.get("generated") or None,
            },
            "outputs": {"file": f"{dataset}.npz", "version": OUTPUTS_VERSION,
                        "logits": out.logits is not None},
            "provenance": {**provenance(backbone, self.cfg, spec),
                           **scale_provenance(self.world.size, self.trained_world_size(model))},
        }
        path = record_path(self.cfg.results_dir, self.cfg.name, model, dataset)
        # cache and data paths relative to cache_dir / data_root: no path of this machine
        write_record(path, portable_record(record, self.cfg.data_root, self.cfg.cache_dir), out)
        return headline

    def ood_pairing(self, dataset: str, head: LinearHead, backbone: Backbone,
                    columns: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The ID set's (MSP, correct) for ``ood_auroc`` and ``id_acc1`` of a shifted cell: the
        same head over the same scored classes, from the ID set's cached features (None for the
        ID cell itself or when the suite pairs nothing)."""
        id_name = self.cfg.id_dataset
        if not id_name or dataset == id_name:
            return None
        id_source, id_feats = self.source_and_features(backbone, id_name)
        if list(id_source.classnames) != list(head.classnames):
            log.warning("ood_auroc of %s is not computed: %s has another label space",
                        dataset, id_name)
            return None
        return id_confidence(head, id_feats, id_source, columns)


def interval_protocol(out: CellOutputs) -> str:
    """How the record's intervals were computed, in words."""
    boot = "bootstrap, percentile interval shifted by the replicates' bias"
    if not out.group_names:
        return f"acc1: Clopper-Pearson; ece, auroc: {boot}, resampling samples"
    unit = "base images (every copy of a drawn image, in every group)" \
        if out.base is not None else "samples"
    return (f"headline acc1, ece, auroc: {boot}, resampling {unit}, mean over the groups per "
            "replicate; each group: acc1 Clopper-Pearson, ece and auroc bootstrap over its rows")


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


def scale_provenance(world_size: int, trained_world_size: int | None) -> dict:
    """How many ranks ran the cell and, for a network robench trained (fine-tuning, CAR-FT,
    LP-FT, FLYP and what is built from one: WiSE-FT, temperature scaling of one), how its
    gradients were summed -- by the ranks that trained it, which a checkpoint reused from the
    cache records (:func:`robench.models.backbone.derived_info`). DDP all-reduces the ranks'
    gradient sums, another float summation order than one process's, so such weights (and their
    metrics) differ in the last bits between world sizes; ``robench check`` compares them in
    band mode. Features and heads that are not trained through DDP (zero-shot, linear probe,
    LP-CLIP) are bit-identical under any world size: their ``grad_reduction`` is null."""
    reduction = None
    if trained_world_size is not None:
        reduction = "single process" if trained_world_size == 1 else \
            f"DDP allreduce over {trained_world_size} ranks"
    return {"world_size": int(world_size), "grad_reduction": reduction}


def kernel_family(backbone: Backbone) -> str:
    """The backbone's device's kernel family (see :func:`robench.models.backbone.kernel_family`)."""
    from robench.models.backbone import kernel_family as device_kernel_family

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
