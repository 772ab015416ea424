"""Suite configs: YAML files in ``suites/`` plus ``key=value`` overrides, merged with OmegaConf.

A suite is validated against a structured schema (:class:`RunConfig`), so a misspelt key fails
with the list of valid keys (closest first) instead of being silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robench.errors import RobenchError, closest_first, unknown

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelDefaults:
    """Defaults applied to every model of a suite (a model entry may override them)."""

    batch_size: int = 256
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast)
    num_workers: int = 2
    # cached features: auto = the precision's (float32 for fp32, float16 otherwise) | float16
    features_dtype: str = "auto"


@dataclass
class MetricsConfig:
    n_bins: int = 15
    bootstrap: int = 200  # resamples for ECE / AUROC intervals; 0 disables them
    alpha: float = 0.05  # interval level is 1 - alpha


@dataclass
class SuiteMeta:
    """Where a config came from, filled in by :func:`load_suite` (never set by the user): the
    suite file and the top-level keys given as ``key=value`` on the command line. It lets the
    runner tell a suite's own choice from the user's (see :func:`pair_id_dataset`)."""

    path: str = ""
    overridden: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """Everything one ``robench run`` needs; every field can be overridden with ``key=value``."""

    name: str = ""
    description: str = ""
    models: list[Any] = field(default_factory=list)
    datasets: list[Any] = field(default_factory=list)
    # open_clip architecture configs (<arch>.json files or folders of them) to register, relative
    # to the suite file's folder (command-line entries: to the working directory); see also
    # $ROBENCH_MODEL_CONFIGS and robench/models/arch_configs.py
    model_configs: list[str] = field(default_factory=list)
    model: ModelDefaults = field(default_factory=ModelDefaults)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Per-dataset overrides, e.g. ``data.imagenet.root=/mnt/imagenet/val``.
    data: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto = cuda > mps > cpu
    seed: int = 0
    id_dataset: str | None = None  # pair every other dataset with this one for ood_auroc
    data_root: str = "data"
    cache_dir: str = ""
    results_dir: str = "runs"  # committed reference results live in results/
    check: str = ""  # baseline folder to check this run against (e.g. results/quickstart)
    allow_download: bool = False  # weights only; datasets are never downloaded implicitly
    force: bool = False
    strict: bool = False  # a corrupt image fails the run instead of being counted and skipped
    progress: bool = True
    # per-sample outputs beside each record: "exact" (top-5, log-normaliser, true-class logit,
    # ...: every metric recomputable) or "logits" (also the full N x C float32 logits)
    outputs: str = "exact"
    # methods may not train, select or calibrate on an evaluated dataset (or one with the same
    # files); true overrides the refusal, e.g. to reproduce a paper that did
    allow_train_on_eval: bool = False
    meta: SuiteMeta = field(default_factory=SuiteMeta)  # filled in by load_suite


def suite_dirs() -> list[Path]:
    """Suite folders: ``$ROBENCH_SUITES``, ``./suites``, then the repo's ``suites/``."""
    dirs = []
    if os.environ.get("ROBENCH_SUITES"):
        dirs.append(Path(os.environ["ROBENCH_SUITES"]))
    dirs += [Path.cwd() / "suites", REPO_ROOT / "suites"]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def available_suites() -> dict[str, Path]:
    """Suite name -> YAML path, earlier directories winning."""
    found: dict[str, Path] = {}
    for d in suite_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Parse ``key=value`` strings (Hydra-style dotlist, values parsed as YAML) with OmegaConf."""
    for ov in overrides:
        if "=" not in ov or ov.startswith("="):
            raise RobenchError(
                f"bad override '{ov}': expected key=value",
                "write overrides as key=value, e.g. model.batch_size=64 or datasets=[cifar10]",
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise RobenchError(f"bad override: {e}", "check the override's syntax (key=value)") from e


def _check_keys(cfg: Any, schema: Any, prefix: str = "") -> None:
    """Reject keys the schema does not have, naming the closest valid key."""
    if not isinstance(cfg, DictConfig) or not isinstance(schema, DictConfig):
        return
    if OmegaConf.get_type(schema) is dict:  # free-form section such as ``data``
        return
    for key in cfg.keys():
        if key not in schema:
            valid = [f"{prefix}{k}" for k in schema.keys()]
            raise unknown("config key", f"{prefix}{key}", valid,
                          fix="check the spelling; `robench run --help` lists the keys")
        _check_keys(cfg[key], schema[key], prefix=f"{prefix}{key}.")


def load_suite(name_or_path: str, overrides: list[str] | None = None) -> DictConfig:
    """Load a suite by name (or YAML path), apply overrides, validate, and resolve paths."""
    overrides = list(overrides or [])
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        suites = available_suites()
        if name_or_path not in suites:
            raise unknown("suite", name_or_path, suites,
                          fix="pass suite=<name> of a file in suites/, or suite=path/to/file.yaml")
        path = suites[name_or_path]
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise RobenchError(f"cannot parse suite file {path}: {e}", "fix the YAML syntax") from e
    schema = OmegaConf.structured(RunConfig)
    over = parse_overrides(overrides)
    _check_keys(raw, schema)
    _check_keys(over, schema)
    for given in (raw, over):
        if "meta" in given:
            raise RobenchError("'meta' is filled in by robench (where the suite came from), not "
                               "a setting", "remove meta from the suite file / the overrides")
    if not raw.get("name"):
        raw.name = path.stem
    try:
        cfg = OmegaConf.merge(schema, raw, over)
    except OmegaConfBaseException as e:
        raise RobenchError(f"invalid value in suite '{path.stem}': {getattr(e, 'msg', e)}",
                           "check the type of the value (e.g. model.batch_size=64)") from e
    if os.environ.get("ROBENCH_DATA") and "data_root" not in raw and not any(
        o.startswith("data_root=") for o in overrides
    ):
        cfg.data_root = os.environ["ROBENCH_DATA"]
    base = Path.cwd() if "model_configs" in over else path.resolve().parent
    cfg.model_configs = [str(base / Path(p).expanduser()) for p in cfg.model_configs]
    if not cfg.cache_dir:
        cfg.cache_dir = os.environ.get("ROBENCH_CACHE", str(Path.home() / ".cache" / "robench"))
    if cfg.model.precision not in ("fp32", "fp16", "bf16"):
        raise RobenchError(f"unknown precision '{cfg.model.precision}'",
                           "use model.precision=fp32, fp16 or bf16")
    if cfg.outputs not in ("exact", "logits"):
        raise RobenchError(f"unknown outputs '{cfg.outputs}'",
                           "use outputs=exact (default) or outputs=logits (also full logits)")
    from robench.features import features_dtype

    features_dtype(cfg.model.precision, cfg.model.features_dtype)
    if not cfg.models or not cfg.datasets:
        raise RobenchError(f"suite '{cfg.name}' names no models or no datasets",
                           "list at least one model and one dataset in the suite")
    cfg.meta.path = str(path.resolve())
    cfg.meta.overridden = sorted(str(k) for k in over.keys())
    return cfg


def pair_id_dataset(cfg: DictConfig, datasets: Sequence[str]) -> str | None:
    """Check ``id_dataset`` against the datasets of this run; return a note when it is dropped.

    A suite's ``id_dataset`` left out by a ``datasets=[...]`` override (running a subset, e.g.
    ``datasets=[imagenet-r]`` of ``imagenet-shifts``) is dropped for this run: ``cfg.id_dataset``
    becomes None, no ``ood_auroc`` is computed, and the note says how to keep the pairing. An
    ``id_dataset`` the user gave on the command line, or a suite file pairing with a dataset it
    does not list, stays an error naming the fix.
    """
    id_ds = cfg.id_dataset
    if not id_ds or id_ds in datasets:
        return None
    overridden = set(cfg.meta.overridden) if "meta" in cfg else set()
    names = ", ".join(datasets)
    if "datasets" in overridden and "id_dataset" not in overridden:
        cfg.id_dataset = None
        return (f"note: suite '{cfg.name}' pairs its datasets with id_dataset={id_ds}, which "
                f"datasets=[{names}] leaves out: ood_auroc is not computed in this run. To keep "
                f"it, add the ID set: datasets=[{names},{id_ds}]")
    close = closest_first(id_ds, datasets)[:5]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if "id_dataset" in overridden:
        raise RobenchError(
            f"id_dataset={id_ds} (given on the command line) is not one of this run's datasets "
            f"({names}).{hint}",
            f"add it to the run (datasets=[{names},{id_ds}]), pair with one of the run's "
            "datasets (id_dataset=NAME), or pass id_dataset=null for no ood_auroc")
    raise RobenchError(
        f"suite '{cfg.name}' sets id_dataset: {id_ds}, which is not one of its datasets "
        f"({names}).{hint}",
        f"list {id_ds} under datasets: in the suite file, set id_dataset to one of them, or pass "
        "id_dataset=null for no ood_auroc")
