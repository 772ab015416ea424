"""A record names no path of the machine that wrote it: cache and data paths are relative to
``cache_dir`` / ``data_root`` (shipped data as ``assets:``), the manifest hash is the identity."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import write_cifar10

from robench.check import run_check
from robench.registry import ASSETS
from robench.results import path_roots, portable_path, portable_paths

SUITE = {
    "name": "p",
    "models": ["tiny-random",
               {"name": "lp", "arch": "robench-tiny-vit", "method": "linear-probe",
                "options": {"train_on": "cifar10-train", "val_on": "cifar10-train",
                            "grid": [1.0]}}],
    "datasets": ["cifar10", "cifar10-subset-val",
                 {"name": "c10-c", "family": "generated-c", "root": "",
                  "options": {"base": "cifar10", "stride": 10}}],
    "id_dataset": "cifar10",
    "metrics": {"bootstrap": 0},
    "model": {"num_workers": 0, "batch_size": 64},
    "device": "cpu", "progress": False,
}


def _run(machine: Path) -> Path:
    """The suite on one "machine": its own data_root, cache_dir and results_dir under
    ``machine``; returns the suite's results folder."""
    from robench.config import build_config
    from robench.runner import Runner

    write_cifar10(machine / "data" / "cifar10", n_test=30, n_train=12)
    cfg = build_config({**SUITE, "data_root": str(machine / "data"),
                        "cache_dir": str(machine / "cache"), "results_dir": str(machine / "r")})
    Runner(cfg).run()
    return machine / "r" / "p"


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("machine-a"), tmp_path_factory.mktemp("machine-b")
    return (a, _run(a)), (b, _run(b))


def _records(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): json.loads(p.read_text())
            for p in sorted(folder.rglob("*.json")) if p.name != "analysis.json"}


def test_a_record_holds_no_absolute_path_of_its_machine(machines):
    (machine, folder), _ = machines
    records = _records(folder)
    assert len(records) == 6  # 2 models x 3 datasets
    here = {str(machine), os.path.realpath(machine), str(ASSETS.parent.parent)}
    for name, rec in records.items():
        text = (folder / name).read_text()
        for path in here:
            assert path not in text, f"{name} holds {path}"
        assert rec["data"]["manifest_hash"]  # the identity of the data, whatever its path
    zs = "tiny-random/"
    assert records[zs + "cifar10.json"]["data"]["root"] == "<data_root>/cifar10"
    assert records[zs + "cifar10-subset-val.json"]["data"]["root"] == "assets:cifar10-subset/val"
    assert re.fullmatch(r"<cache_dir>/corrupted/[0-9a-f]{24}",
                        records[zs + "c10-c.json"]["data"]["root"])
    artifact = records["lp/cifar10.json"]["method"]["head"]["artifact"]
    assert re.fullmatch(r"<cache_dir>/artifacts/linear-probe/[0-9a-f]+", artifact)


def test_two_machines_write_the_same_paths_and_check_passes(machines):
    (_, a), (_, b) = machines
    ra, rb = _records(a), _records(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        assert ra[name]["data"] == rb[name]["data"], name
        assert ra[name]["method"] == rb[name]["method"], name
        assert ra[name]["metrics"] == rb[name]["metrics"], name
    res = run_check(a, b)
    assert not res.failed and set(res.mode.values()) == {"exact"}


def test_portable_path_names_the_deepest_root(tmp_path):
    roots = path_roots(tmp_path, tmp_path / "cache")  # a cache inside the data root
    assert portable_path(str(tmp_path / "cache" / "x" / "y.npy"), roots) == "<cache_dir>/x/y.npy"
    assert portable_path(str(tmp_path / "imagenet-r"), roots) == "<data_root>/imagenet-r"
    assert portable_path(str(tmp_path), roots) == "<data_root>"
    assert portable_path(f"local-dir:{tmp_path / 'cache' / 'ft'}", roots) == \
        "local-dir:<cache_dir>/ft"
    assert portable_path(str(ASSETS / "models" / "m.pt"), roots) == "assets:models/m.pt"
    # a sibling whose name starts like the root is not inside it; other paths and text stay
    assert portable_path(f"{tmp_path}-other/x", roots) == f"{tmp_path}-other/x"
    for text in ("/mnt/imagenet/val", "zeroshot", "", "fog/3", "assets:cifar10-subset/test"):
        assert portable_path(text, roots) == text
    link = tmp_path.parent / f"{tmp_path.name}-link"  # the cache reached through a symlink
    link.symlink_to(tmp_path / "cache")
    assert portable_path(str(link / "f.npy"), roots) == "<cache_dir>/f.npy"
    nested = {"a": [str(tmp_path / "d"), 1, None], "b": {"c": str(tmp_path / "cache")}}
    assert portable_paths(nested, roots) == {"a": ["<data_root>/d", 1, None],
                                             "b": {"c": "<cache_dir>"}}
