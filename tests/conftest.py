"""Shared fixtures: tiny models saved by the tests themselves, datasets in the real layouts."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing tag must fail fast, never retry the network

REPO = Path(__file__).resolve().parent.parent
REALDATA = REPO.parent / "shared" / "realdata"
CIFAR_EXACT = REALDATA / "cifar10" / "cifar10_test_first932_exact.npz"
TINY = "robench-tiny-vit"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def script_module(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package), loaded once."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


def cifar_pixels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real CIFAR-10 test images (bit-exact) when shared/realdata is present, else noise."""
    if CIFAR_EXACT.is_file():
        z = np.load(CIFAR_EXACT)
        reps = -(-n // len(z["labels"]))
        return np.tile(z["images"], (reps, 1, 1, 1))[:n], np.tile(z["labels"], reps)[:n]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar10(root: Path, n_test: int = 40, n_train: int = 10) -> Path:
    """CIFAR-10 in torchvision's pickle layout: root/cifar-10-batches-py/{data_batch_1..5,...}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int, seed: int) -> None:
        x, y = cifar_pixels(n, seed)
        data = x.transpose(0, 3, 1, 2).reshape(n, -1)  # torchvision stores CHW planes per row
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in y]}, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", n_train, i)
    batch("test_batch", n_test, 0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES}, f)
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests (and the CLI they spawn) never write into the user's ~/.cache/robench: loaders
    without an explicit cache_dir keep their content index in a session folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBENCH_CACHE", str(tmp_path_factory.mktemp("robench-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_backbone():
    from robench.models.backbone import load_backbone

    return load_backbone(TINY, None, device="cpu", seed=123)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    """A checkpoint file saved by the test itself (the 'local file' loading path)."""
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_local_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """An open_clip ``local-dir:`` folder: open_clip_config.json + open_clip_pytorch_model.bin."""
    import shutil

    from robench.models.backbone import CONFIG_DIR

    d = tmp_path_factory.mktemp("localdir")
    cfg = json.loads((CONFIG_DIR / f"{TINY}.json").read_text())
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    shutil.copyfile(tiny_checkpoint, d / "open_clip_pytorch_model.bin")
    return d


@pytest.fixture()
def cifar_root(tmp_path) -> Path:
    return write_cifar10(tmp_path / "data" / "cifar10")


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m robench`` in a subprocess (as a user, or ``torchrun -m robench``, would)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "robench", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or REPO, timeout=timeout)


OUTPUT_FIELDS = ("topk_index", "topk_logit", "log_norm", "true_logit", "label_rank",
                 "sum_sq_prob", "label", "target", "valid")


def cell_outputs(path: Path) -> dict[str, np.ndarray]:
    """The exact per-sample outputs stored beside a record (``<dataset>.npz``)."""
    with np.load(Path(path).with_suffix(".npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def same_outputs(a: Path, b: Path) -> bool:
    """Whether two cells' per-sample outputs are bit-identical (same logits up to the top 5,
    same normalisers, same true-class logits)."""
    x, y = cell_outputs(a), cell_outputs(b)
    return all(np.array_equal(x[k], y[k]) for k in OUTPUT_FIELDS)


def derived_state(pretrained: str) -> dict:
    """The weights of a derived ``local-dir:`` checkpoint (fine-tuned, CAR-FT, WiSE-FT)."""
    from safetensors.torch import load_file

    return load_file(str(Path(pretrained.removeprefix("local-dir:")) /
                         "open_clip_model.safetensors"))


def run_cifar_suite(tmp: Path, suite: str):
    """Write ``suite`` to ``tmp/s.yaml`` and run it in-process on a CIFAR-10 fixture (30 test,
    5 x 12 train images) under ``tmp``; returns (runner, the suite's results folder)."""
    from robench.config import load_suite
    from robench.runner import Runner

    write_cifar10(tmp / "data" / "cifar10", n_test=30, n_train=12)
    (tmp / "s.yaml").write_text(suite)
    cfg = load_suite(str(tmp / "s.yaml"), [f"data_root={tmp / 'data'}", f"cache_dir={tmp / 'c'}",
                                           f"results_dir={tmp / 'r'}", "device=cpu"])
    runner = Runner(cfg)
    runner.run()
    return runner, tmp / "r" / "s"


def cifar_cell(out: Path, model: str) -> Path:
    """The record of ``model`` on the CIFAR-10 fixture."""
    return out / model / "cifar10.json"


# -- LP-CLIP's label firewall: a training split whose labels must never be read ---------------
class LabelFree:
    """An image source whose labels raise on access (a split LP-CLIP must never read)."""

    def __init__(self, source) -> None:
        self._src = source
        self.name, self.classnames = source.name, source.classnames
        self.manifest_hash, self.info = source.manifest_hash, source.info
        self._n = len(source.info["paths"])

    def __len__(self) -> int:
        return self._n

    def load_image(self, i: int):
        return self._src.load_image(i)

    @property
    def labels(self):
        raise AssertionError("the labels of the LP-CLIP training split were read")


def shipped_val():
    """The 500 shipped CIFAR-10 validation images, as robench's folder loader reads them."""
    from robench.data.folder import load
    from robench.registry import ASSETS

    return load(ASSETS / "cifar10-subset" / "val", name="cifar10-subset-val")


def with_hidden_split(runner):
    """``runner`` with a training split "hidden": the shipped val images (same manifest and
    template set, so shared weak features) behind :class:`LabelFree`, so that reading a
    training label fails the run."""
    from robench.registry import DatasetSpec, get_dataset

    real = runner.source

    def source(name: str):
        if name == "hidden" and name not in runner.sources:
            runner.dataset_specs[name] = DatasetSpec(
                "folder", "assets:cifar10-subset/val",
                templates=get_dataset("cifar10-subset-val").templates)
            runner.sources[name] = LabelFree(shipped_val())
        return real(name)

    runner.source = source
    return runner


def reachable(root: object) -> list[object]:
    """Every object reachable from ``root`` through references (the garbage collector's view),
    not descending into modules, classes or module globals (code, not data of this run)."""
    import gc
    import types

    def is_globals(o: object) -> bool:
        return isinstance(o, dict) and "__builtins__" in o and "__name__" in o

    seen, stack, out = {id(root)}, [root], []
    while stack:
        obj = stack.pop()
        out.append(obj)
        for ref in gc.get_referents(obj):
            if id(ref) in seen or isinstance(ref, (type, types.ModuleType)) or is_globals(ref):
                continue
            seen.add(id(ref))
            stack.append(ref)
    assert len(out) < 100_000
    return out


# -- result records that are what their per-sample outputs give --------------------------------
def scored_record(folder: Path, model: str = "m", dataset: str = "d", *, seed: int = 0,
                  n: int = 400, skill: float = 1.0, groups: tuple[str, ...] = (),
                  bootstrap: int = 20, **sections: dict) -> Path:
    """Write ``folder/model/dataset.json`` and its ``.npz``: a record of ``n`` synthetic
    10-class samples (Gaussian logits, the true class raised by ``skill``) whose metrics
    ``robench.scoring.cell_metrics`` computes as a run does, so every verified reader accepts
    it. ``groups`` splits the rows into copies of the same base images (a -C set); each of
    ``sections`` (protocol, provenance, data, ...) updates that part of the record. Returns
    the record's path."""
    import robench.metrics as M  # noqa: N812
    from robench.results import write_record
    from robench.scoring import CellOutputs, cell_metrics

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    logits[np.arange(n), labels] += np.float32(skill)
    k = max(1, len(groups))
    group = (np.arange(n) * k // n).astype(np.int32) if groups else np.full(n, -1, np.int32)
    out = CellOutputs(samples=M.sample_outputs(logits, labels), label=labels,
                      target=labels.astype(np.int32), valid=np.ones(n, dtype=bool), group=group,
                      group_names=list(groups), scored_classes=None, sample_ids=None,
                      base=np.arange(n) % (n // k) if groups else None)
    headline, per_group = cell_metrics(out, list(groups) or None, n_bins=15,
                                       n_bootstrap=bootstrap, seed=0, alpha=0.05)
    record = {
        "suite": "s", "model": model, "dataset": dataset, "cell_key": "k",
        "metrics": headline, "groups": per_group,
        "protocol": {"version": 3, "method": "zeroshot", "confidence": "msp", "ece_bins": 15,
                     "bootstrap": bootstrap, "interval_level": 0.95, "seed": 0,
                     "adaptive_bins": "robench", "summary_groups": list(groups) or None,
                     "template_set": "cifar", "n_templates": 18, "scored_classes": "all",
                     "id_dataset": None},
        "data": {"manifest_hash": "abc"},
        "outputs": {"file": f"{dataset}.npz"},
        "provenance": {"torch": "2.14.1", "numpy": "2.4", "open_clip": "3.3.0",
                       "device": "cpu", "dtype": "fp32", "kernels": "cpu-X",
                       "weights_hash": "w", "world_size": 1, "grad_reduction": None},
    }
    for name, part in sections.items():
        record[name] = {**record.get(name, {}), **part}
    path = Path(folder) / model / f"{dataset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, record, out)
    return path


@contextlib.contextmanager
def meaning_unchecked() -> Iterator[None]:
    """Read hand-made records whose numbers no per-sample outputs give (tests of how tables and
    the report RENDER chosen numbers): the readers' check of a record's metrics against its
    outputs (``robench.results.check_meaning``) is switched off inside. That every reader
    refuses such a record is tested in tests/test_record_meaning.py."""
    import robench.results

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(robench.results, "check_meaning", lambda path, record: None)
        yield


@pytest.fixture()
def unverified_meaning() -> Iterator[None]:
    """:func:`meaning_unchecked` for one test."""
    with meaning_unchecked():
        yield
