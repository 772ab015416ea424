"""Every cache entry and record is checked when read: a flipped byte or a truncation in any kind
of entry is named, removed and rebuilt, and the next run reproduces the baseline exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cell_outputs, run_cli

from robench.io import (
    CorruptEntry,
    load_npy,
    read_json,
    sum_path,
    verify_file,
    write_json,
    write_npy,
)

MODELS = (f"[{{name: zs, arch: {TINY}}}, "
          f"{{name: lp, arch: {TINY}, method: linear-probe, "
          "options: {train_on: cifar10-subset-probe, val_on: cifar10-subset-probe, grid: [1.0]}}, "
          f"{{name: ft, arch: {TINY}, method: finetune, "
          "options: {train_on: cifar10-subset-probe, epochs: 1, batch_size: 128}}]")
DATASETS = ("[cifar10-subset-val, {name: val-c, family: generated-c, root: '', "
            "options: {base: cifar10-subset-val, stride: 50}}]")


def _run(tmp: Path, *extra: str):
    r = run_cli("run", "suite=smoke", f"models={MODELS}", f"datasets={DATASETS}",
                "id_dataset=cifar10-subset-val", "metrics.bootstrap=0", "device=cpu",
                f"cache_dir={tmp / 'c'}", f"results_dir={tmp / 'r'}", "model.num_workers=0",
                "progress=false", *extra, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r


def _results(tmp: Path) -> dict:
    out = {}
    for rec in sorted((tmp / "r" / "smoke").rglob("*.json")):
        if rec.name == "analysis.json":  # the suite's cross-cell analysis, not a cell
            continue
        data = json.loads(rec.read_text())
        out[rec.relative_to(tmp / "r")] = (data["metrics"], data["groups"], cell_outputs(rec))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and a[k][1] == b[k][1], k
        assert a[k][2].keys() == b[k][2].keys()
        for f in a[k][2]:
            assert np.array_equal(a[k][2][f], b[k][2][f]), (k, f)


def _entries(cache: Path) -> dict[str, Path]:
    """One file of every kind of cache entry."""
    one = lambda pattern: sorted(cache.glob(pattern))[0]  # noqa: E731
    return {
        "features": max(cache.glob("features/*.npy"), key=lambda p: p.stat().st_size),
        "text head": one("text/*/*.npz"),
        "linear-probe head": one("artifacts/linear-probe/*/head.npz"),
        "fine-tuned checkpoint": one("artifacts/finetune/*/model/open_clip_model.safetensors"),
        "fine-tuned head": one("artifacts/finetune/*/model/robench_head.npz"),
        "generated -C": one("corrupted/*/fog.npy"),
        "content index": one("content-index/*.npz"),
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit in the middle: a mantissa, a pixel, a deflate block
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    _run(tmp)
    return tmp, _results(tmp)


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flip", "truncate"])
def test_a_damaged_cache_entry_of_every_kind_is_rebuilt_and_the_numbers_stay(baseline, damage):
    tmp, want = baseline
    entries = _entries(tmp / "c")
    for path in entries.values():
        damage(path)
    r = _run(tmp, "force=true")  # every cell recomputed from the (damaged) cache
    for kind, path in entries.items():
        assert str(path) in r.stderr, f"{kind} damage not reported"
    assert "removed, rebuilding it" in r.stderr
    _same(_results(tmp), want)
    for path in _entries(tmp / "c").values():
        verify_file(path)  # rebuilt and sealed again


def test_a_damaged_record_or_outputs_file_makes_its_cell_pending(baseline):
    tmp, want = baseline
    root = tmp / "r" / "smoke"
    flipped, truncated, outputs = root / "zs" / "val-c.json", root / "lp" / "val-c.json", \
        root / "ft" / "cifar10-subset-val.npz"
    text = flipped.read_text()
    flipped.write_text(text.replace('"acc1": ', '"acc1": 1', 1))  # a "better" number by hand
    _truncate(truncated)
    _flip(outputs)
    r = _run(tmp)
    assert "3 of 6 cell(s) already done" in r.stdout
    assert "fails its checksum" in r.stderr and "cannot read result record" in r.stderr
    assert "per-sample outputs" in r.stderr
    _same(_results(tmp), want)


def test_unsealed_or_mislabelled_entries_are_refused(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_npy(tmp_path / "a.npy", arr)
    assert np.array_equal(load_npy(tmp_path / "a.npy"), arr)
    np.save(tmp_path / "b.npy", arr)  # no checksum: not trusted
    with pytest.raises(CorruptEntry, match="has no checksum"):
        load_npy(tmp_path / "b.npy")
    # same bytes, other shape claimed: the sidecar's shape and dtype are checked too
    side = json.loads(sum_path(tmp_path / "a.npy").read_text())
    sum_path(tmp_path / "a.npy").write_text(json.dumps({**side, "shape": [4, 3]}))
    with pytest.raises(CorruptEntry, match=r"holds float32\[3, 4\]"):
        load_npy(tmp_path / "a.npy")
    write_json(tmp_path / "m.json", {"bad": [1]})
    os.utime(tmp_path / "m.json", ns=(1, 1))  # a new mtime: verified afresh, not from memory
    assert read_json(tmp_path / "m.json") == {"bad": [1]}
