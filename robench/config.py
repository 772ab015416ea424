"""Suite configs: YAML files in ``suites/`` plus ``key=value`` overrides, merged with OmegaConf.

A suite is validated against a structured schema (:class:`RunConfig`), so a misspelt key fails
with the list of valid keys (closest first) instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robench.errors import RobenchError, closest_first, unknown

PACKAGE_SUITES = Path(__file__).resolve().parent / "suites"  # shipped in the wheel
VERBOSITY = ("quiet", "normal", "verbose")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
# upper bounds of counts: beyond them a value is a typo'd exponent, not a setting (and would
# fail deep inside numpy or a process pool)
MAX_BINS, MAX_BOOTSTRAP, MAX_BATCH, MAX_WORKERS = 10**5, 10**6, 2**20, 1024


def _f(default: Any = MISSING, help: str = "", factory: Any = MISSING) -> Any:  # noqa: A002
    """A schema field with its one-line meaning (``robench run --help`` prints it)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class ModelDefaults:
    """Defaults applied to every model of a suite (a model entry may override them)."""

    batch_size: int = _f(256, "images per forward pass")
    precision: str = _f("fp32", "fp32 | fp16 | bf16 (autocast)")
    num_workers: int = _f(2, "DataLoader processes decoding images (0: in the main process)")
    features_dtype: str = _f("auto", "cached features: auto (float32 for fp32 runs, float16 "
                             "otherwise) | float16 | float32")


@dataclass
class MetricsConfig:
    n_bins: int = _f(15, "equal-width confidence bins of ECE / MCE")
    bootstrap: int = _f(200, "bootstrap resamples for the ECE / AUROC intervals (0: none)")
    alpha: float = _f(0.05, "interval level is 1 - alpha (0.05: 95% intervals)")
    adaptive_bins: str = _f("robench", "equal-mass bins of ece_adaptive: robench (sample at "
                            "sorted rank r in bin floor(r * n_bins / n)) | torch-uncertainty "
                            "(its AdaptiveCalibrationError's cut: the first n mod n_bins bins "
                            "one larger)")


@dataclass
class AnalysisConfig:
    """Cross-cell analyses written after a run (robench/analysis.py; `robench analyze`)."""

    reference: str | None = _f(None, "model every other is compared with, paired on the same "
                               "samples (null: the zero-shot model of the same backbone)")
    bootstrap: int | None = _f(None, "paired-bootstrap resamples of the deltas (null: "
                               "metrics.bootstrap)")
    er_reference: Any = _f(None, "models whose ID / OOD accuracies define the effective-"
                           "robustness line: a list, all, or null (no fit)")
    er_fits: str = _f("", "file of effective-robustness fit coefficients with their source "
                      "(JSON/YAML list of {id_dataset, ood_dataset, slope, intercept, source})")
    mce_baseline: str = _f("auto", "mCE normaliser: auto (AlexNet's published errors, on the "
                           "released imagenet-c or a set generated with its full protocol; "
                           "others get a note) | alexnet | a model of the suite | none")


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

    name: str = _f("", "suite name (default: the YAML file's name); records go to "
                   "results_dir/name")
    description: str = _f("", "one line shown by `robench list suites`")
    models: list[Any] = _f(help="registry names or inline declarations "
                           "{name: x, arch: ViT-B-32, pretrained: /w.pt, method: zeroshot}",
                           factory=list)
    datasets: list[Any] = _f(help="registry names or inline declarations "
                             "{name: x, family: folder, root: /dir}", factory=list)
    model_configs: list[str] = _f(help="open_clip architecture configs (<arch>.json files or "
                                  "folders of them) to register, relative to the suite file "
                                  "(also $ROBENCH_MODEL_CONFIGS)", factory=list)
    model: ModelDefaults = _f(factory=ModelDefaults)
    metrics: MetricsConfig = _f(factory=MetricsConfig)
    analysis: AnalysisConfig = _f(factory=AnalysisConfig)
    data: dict[str, Any] = _f(help="per-dataset settings, e.g. data.imagenet.root=/mnt/val",
                              factory=dict)
    device: str = _f("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    seed: int = _f(0, "seed of everything random (bootstrap, training, random init)")
    id_dataset: str | None = _f(None, "pair every other dataset with this one for ood_auroc "
                                "(null: none)")
    data_root: str = _f("data", "folder holding the datasets (or $ROBENCH_DATA)")
    cache_dir: str = _f("", "features, text heads, trained heads, checkpoints (default: "
                        "$ROBENCH_CACHE, else ~/.cache/robench)")
    results_dir: str = _f("runs", "records go to results_dir/<suite>/<model>/<dataset>.json "
                          "(committed reference records: results/)")
    check: str = _f("", "after the run, check against this baseline folder "
                    "(e.g. results/quickstart)")
    allow_download: bool = _f(False, "let open_clip download missing weights (datasets are "
                              "never downloaded implicitly)")
    force: bool = _f(False, "recompute cells whose record already exists")
    strict: bool = _f(False, "fail on a corrupt image instead of counting and skipping it")
    progress: bool = _f(True, "progress bars on a terminal; in a pipe one line per step (and "
                        "per ~10% of a long one); false: none")
    verbosity: str = _f("normal", "quiet (only the final table, warnings and errors) | normal "
                        "| verbose (+ info logs)")

    outputs: str = _f("exact", "per-sample outputs beside each record: exact (top-5 logits, "
                      "log-normaliser, true-class logit, ...: every metric recomputable) | "
                      "logits (also the full N x C float32 logits)")
    allow_train_on_eval: bool = _f(False, "let a method train, select or calibrate on an "
                                   "evaluated dataset (or one with the same files)")
    meta: SuiteMeta = field(default_factory=SuiteMeta)  # filled in by load_suite, not a key


def config_keys(schema: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every config field, nested sections flattened (``model.
    batch_size``), in schema order: the one source of ``robench run --help``."""
    types = get_type_hints(schema)
    out = []
    for f in fields(schema):
        if f.name == "meta":  # where the config came from, not a setting
            continue
        if is_dataclass(types[f.name]):
            out += config_keys(types[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = OmegaConf.to_yaml(OmegaConf.create({"v": default})).strip()[3:]
        out.append((f"{prefix}{f.name}", shown, f.metadata.get("help", "")))
    return out


def config_help() -> str:
    """The table of config keys printed by ``robench run --help``."""
    keys = config_keys()
    width = max(len(f"{k}={d}") for k, d, _ in keys)
    lines = ["config keys (key=default  meaning); a suite sets them, key=value overrides them:"]
    for k, d, h in keys:
        lines += textwrap.wrap(h, 100, initial_indent=f"  {f'{k}={d}':{width}s}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def suite_dirs() -> list[Path]:
    """Suite folders, earlier ones winning: ``$ROBENCH_SUITES``, ``./suites``, then the suites
    shipped inside the package (``robench/suites``, which in a checkout is the top-level
    ``suites/``)."""
    dirs = []
    if os.environ.get("ROBENCH_SUITES"):
        dirs += [Path(p) for p in os.environ["ROBENCH_SUITES"].split(os.pathsep) if p]
    dirs += [Path.cwd() / "suites", PACKAGE_SUITES]
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
                "write overrides as key=value, e.g. model.batch_size=64 or 'datasets=[cifar10]'",
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
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
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        suites = available_suites()
        if name_or_path not in suites:
            where = ", ".join(str(d) for d in suite_dirs()) or "no suite folder found"
            raise unknown("suite", name_or_path, suites,
                          fix=f"pass suite=<name> of a file in the suite folders ({where}; "
                          "$ROBENCH_SUITES adds one), or suite=path/to/file.yaml")
        path = suites[name_or_path]
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise RobenchError(f"cannot parse suite file {path}: {e}", "fix the YAML syntax") from e
    if not isinstance(raw, DictConfig):
        raise RobenchError(f"suite file {path} is not a mapping of config keys",
                           "write it as `models: [...]`, `datasets: [...]`, ... (see suites/)")
    return build_config(raw, overrides, default_name=path.stem, suite_path=path)


def build_config(raw: DictConfig | dict, overrides: list[str] | None = None,
                 default_name: str = "", suite_path: Path | None = None) -> DictConfig:
    """Validate a suite's content (a YAML mapping or a dict) against :class:`RunConfig`, apply
    ``key=value`` overrides and fill the environment defaults."""
    overrides = list(overrides or [])
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    schema = OmegaConf.structured(RunConfig)
    over = parse_overrides(overrides)
    _check_keys(raw, schema)
    _check_keys(over, schema)
    for given in (raw, over):
        if "meta" in given:
            raise RobenchError("'meta' is filled in by robench (where the suite came from), not "
                               "a setting", "remove meta from the suite file / the overrides")
    if not raw.get("name"):
        raw.name = default_name
    from robench.registry import check_name

    check_name("suite", over.get("name") or raw.name)
    try:
        cfg = OmegaConf.merge(schema, raw, over)
    except OmegaConfBaseException as e:
        raise RobenchError(f"invalid value in suite '{raw.name}': {getattr(e, 'msg', e)}",
                           "check the type of the value (e.g. model.batch_size=64)") from e
    if os.environ.get("ROBENCH_DATA") and "data_root" not in raw and not any(
        o.startswith("data_root=") for o in overrides
    ):
        cfg.data_root = os.environ["ROBENCH_DATA"]
    base = Path.cwd() if "model_configs" in over or suite_path is None \
        else Path(suite_path).resolve().parent
    cfg.model_configs = [str(base / Path(p).expanduser()) for p in cfg.model_configs]
    if not cfg.cache_dir:
        cfg.cache_dir = os.environ.get("ROBENCH_CACHE", str(Path.home() / ".cache" / "robench"))
    validate(cfg)
    cfg.meta.path = str(Path(suite_path).resolve()) if suite_path else ""
    cfg.meta.overridden = sorted(str(k) for k in over.keys())
    return cfg


def validate(cfg: DictConfig) -> None:
    """Values the schema's types cannot check, caught before any data or model is touched."""
    if cfg.model.precision not in ("fp32", "fp16", "bf16"):
        raise RobenchError(f"unknown precision '{cfg.model.precision}'",
                           "use model.precision=fp32, fp16 or bf16")
    if cfg.outputs not in ("exact", "logits"):
        raise RobenchError(f"unknown outputs '{cfg.outputs}'",
                           "use outputs=exact (default) or outputs=logits (also full logits)")
    from robench.features import features_dtype

    features_dtype(cfg.model.precision, cfg.model.features_dtype)
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise RobenchError(f"unknown device '{cfg.device}'",
                           "use device=cuda (an NVIDIA GPU; cuda:1 for the second), device=mps "
                           "(Apple silicon), device=cpu, or device=auto (cuda > mps > cpu)")
    if cfg.verbosity not in VERBOSITY:
        raise unknown("verbosity", cfg.verbosity, VERBOSITY,
                      fix="use verbosity=quiet, normal or verbose")
    ranges = [("metrics.n_bins", cfg.metrics.n_bins, 1, MAX_BINS, "15"),
              ("metrics.bootstrap", cfg.metrics.bootstrap, 0, MAX_BOOTSTRAP,
               "200 (0: no intervals)"),
              ("model.batch_size", cfg.model.batch_size, 1, MAX_BATCH, "256"),
              ("model.num_workers", cfg.model.num_workers, 0, MAX_WORKERS, "2 (0: decode in "
               "the main process)"),
              ("seed", cfg.seed, 0, None, "0")]
    for key, value, low, high, example in ranges:
        if value < low:
            raise RobenchError(f"{key}={value} must be >= {low}", f"e.g. {key}={example}")
        if high is not None and value > high:  # a typo'd exponent, not a setting
            raise RobenchError(f"{key}={value} is beyond any sensible value (at most {high:,})",
                               f"e.g. {key}={example}")
    if cfg.seed >= 2**32:
        raise RobenchError(f"seed={cfg.seed} must be below 2**32 (numpy's seed range)",
                           "e.g. seed=0")
    if not 0 < cfg.metrics.alpha < 1:
        raise RobenchError(f"metrics.alpha={cfg.metrics.alpha} must lie in (0, 1)",
                           "e.g. metrics.alpha=0.05 for 95% intervals")
    from robench.metrics import ADAPTIVE_BINS

    if cfg.metrics.adaptive_bins not in ADAPTIVE_BINS:
        raise unknown("metrics.adaptive_bins", cfg.metrics.adaptive_bins, ADAPTIVE_BINS,
                      fix="use metrics.adaptive_bins=robench (default) or "
                          "metrics.adaptive_bins=torch-uncertainty")
    _validate_sections(cfg)
    _declared_once(cfg)
    if not cfg.models or not cfg.datasets:
        raise RobenchError(f"suite '{cfg.name}' names no models or no datasets",
                           "list at least one model and one dataset in the suite")


def preflight(cfg: DictConfig) -> None:
    """Before a run, what the run needs at its end: ``results_dir`` and ``cache_dir`` can be
    written (a file in the way, or a read-only folder), the ``check=`` baseline and the
    ``analysis.er_fits`` file exist -- failing now, not after every cell has been computed.
    Not part of :func:`validate`: commands that only read a suite (``data verify --suite``)
    need none of them."""
    from robench.outpaths import output_folder

    examples = {"results_dir": "runs", "cache_dir": "~/.cache/robench"}
    for key, example in examples.items():
        # a finished cache may sit on a read-only mount: its entries are read without a lock
        output_folder(cfg[key], key, f"set {key} to a folder that can be written (created if "
                      f"missing), e.g. {key}={example}", read_only_ok=key == "cache_dir")
    if cfg.check and not Path(cfg.check).expanduser().is_dir():
        raise RobenchError(f"check={cfg.check}: no such baseline folder",
                           "point check= at a folder of committed records (e.g. "
                           "check=results/quickstart), or leave it empty")
    fits = cfg.analysis.er_fits
    if fits and not Path(fits).expanduser().is_file():
        raise RobenchError(f"analysis.er_fits={fits} does not exist",
                           "point it at a JSON/YAML file of fits, or leave it empty")


def _declared_once(cfg: DictConfig) -> None:
    """A model or dataset name is declared once per suite: a second declaration under the
    same name would silently replace the first (and share its records)."""
    for key in ("models", "datasets"):
        seen: set[str] = set()
        for item in cfg[key]:
            name = item.get("name") if isinstance(item, DictConfig) else item
            if not isinstance(name, str):
                continue  # not a name: the registry names what is wrong with the entry
            if name in seen:
                raise RobenchError(f"{key[:-1]} '{name}' is listed twice in suite '{cfg.name}'",
                                   f"keep one entry named {name}, or give the other its own "
                                   "name")
            seen.add(name)


def _validate_sections(cfg: DictConfig) -> None:
    """The free-form ``data`` section and the analysis settings the schema types loosely."""
    for name, entry in cfg.data.items():
        if not isinstance(entry, DictConfig):
            raise RobenchError(f"data.{name}={entry!r} must be a mapping of settings",
                               f"e.g. data.{name}.root=/path/to/{name}")
    boot = cfg.analysis.bootstrap
    if boot is not None and not 0 <= boot <= MAX_BOOTSTRAP:
        raise RobenchError(f"analysis.bootstrap={boot} must lie in 0..{MAX_BOOTSTRAP:,} (or "
                           "null: metrics.bootstrap)", "e.g. analysis.bootstrap=1000")
    ref = cfg.analysis.er_reference
    names = list(ref) if OmegaConf.is_list(ref) else None
    if not (ref is None or isinstance(ref, str)
            or (names is not None and all(isinstance(n, str) for n in names))):
        raise RobenchError(f"analysis.er_reference={ref!r} must be a list of model names, all, "
                           "or null", "e.g. 'analysis.er_reference=[ref-resnet-e4,ref-convnext-"
                           "e4]'")


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
