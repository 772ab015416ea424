"""Full and read-only disks, and what killed commands leave behind (issue 22, item 8).

Where this process may mount a small tmpfs (root with CAP_SYS_ADMIN, as in CI's container), the
full disk and the read-only cache are real file systems; elsewhere those two tests skip, and
their in-process counterparts (the same code paths, the failure injected) still run."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from robench.errors import RobenchError
from robench.io import WriteError, atomic_write, process_tag

# the message torch.save gives when its file cannot grow (seen on a full tmpfs)
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``where`` for the block, or a skip."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


# -- a full disk ---------------------------------------------------------------------------------
def test_a_full_disk_under_torch_save_is_named(tmp_path, monkeypatch) -> None:
    """torch.save reports a full disk as a RuntimeError; robench names it, keeps nothing."""
    from robench import io

    def full(obj: object, f: object) -> None:
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(io, "_free_bytes", lambda folder: 0)
    with pytest.raises(WriteError, match="no space left on the device") as e:
        atomic_write(tmp_path / "checkpoint.pt", lambda tmp: torch.save({}, tmp))
    assert "free space there" in e.value.fix and not list(tmp_path.iterdir())
    monkeypatch.setattr(io, "_free_bytes", lambda folder: 1 << 40)  # room: not a full disk
    with pytest.raises(RuntimeError, match="enforce fail"):
        atomic_write(tmp_path / "checkpoint.pt", lambda tmp: torch.save({}, tmp))


def test_a_real_full_disk_while_saving_checkpoints_is_named(tmp_path, tiny_backbone) -> None:
    from robench.models.backbone import save_derived

    with tmpfs(tmp_path / "small", "300k") as disk:
        big = {"w": torch.zeros(200_000)}  # 800 kB
        with pytest.raises(WriteError, match="no space left"):
            atomic_write(disk / "checkpoint.pt", lambda tmp: torch.save(big, tmp))
        with pytest.raises(WriteError, match="no space left"):
            save_derived(tiny_backbone, {**tiny_backbone.model.state_dict(), **big},
                         disk / "model")
        assert not [p for p in disk.iterdir()]  # no temporary left behind


# -- a read-only cache ---------------------------------------------------------------------------
SUITE = """
description: a fine-tuned model and its zero-shot parent on a small split
models:
  - tiny-random
  - {name: ft, arch: robench-tiny-vit, pretrained: null, method: finetune,
     options: {train_on: cifar10-subset-val, epochs: 1, batch_size: 64, workers: 0}}
datasets:
  - cifar10-subset-probe
  - {name: probe-c, family: generated-c, root: "", templates: cifar-context,
     options: {base: cifar10-subset-probe, stride: 100}}
id_dataset: cifar10-subset-probe
progress: false
metrics: {bootstrap: 20}
model: {batch_size: 256, num_workers: 0}
"""


def run(suite: Path, cache: Path, results: Path) -> list[dict]:
    from robench.cli import main

    assert main(["-q", "run", f"suite={suite}", "device=cpu", f"cache_dir={cache}",
                 f"results_dir={results}"]) == 0
    return sorted((json.loads(p.read_text())["metrics"] for p in results.rglob("*.json")
                   if p.name != "analysis.json" and "." not in p.parent.name[:1]),
                  key=lambda m: (m["acc1"], m["ece"]))


def test_a_complete_cache_is_read_without_a_lock(tmp_path, monkeypatch) -> None:
    """Every cached kind (features, text heads, the fine-tuned checkpoint, the generated -C
    set) is read with no lock once it is complete and verified: a read-only cache works."""
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    first = run(suite, tmp_path / "cache", tmp_path / "r1")

    def no_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete cache entry was locked")

    import robench.artifacts
    import robench.data.corrupt_set
    import robench.features
    import robench.models.finetune

    for module in (robench.artifacts, robench.data.corrupt_set, robench.features,
                   robench.models.finetune):
        monkeypatch.setattr(module, "entry_lock", no_lock)
    assert run(suite, tmp_path / "cache", tmp_path / "r2") == first


def test_a_complete_cache_on_a_read_only_mount_is_read(tmp_path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    with tmpfs(tmp_path / "cache", "64m") as cache:
        first = run(suite, cache, tmp_path / "r1")
        read_only(cache)
        with pytest.raises(OSError):
            (cache / "probe").write_text("x")  # really read-only
        assert run(suite, cache, tmp_path / "r2") == first


# -- what killed commands leave ------------------------------------------------------------------
def dead_tag() -> str:
    dead = subprocess.run(["python3", "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    return f"{dead}-{process_tag().split('-')[1]}"


def test_a_killed_report_leaves_nothing_the_next_one_keeps(tmp_path) -> None:
    from robench.report.render import render_report

    results = Path(__file__).resolve().parents[1] / "results"
    out = tmp_path / "report"
    out.mkdir()
    stale = out / f".index.html.{dead_tag()}.k2j3.tmp"
    stale.write_bytes(b"x" * 1_400_000)  # what a report killed while writing leaves
    render_report(results, out)
    assert not stale.exists() and (out / "index.html").is_file()


def test_a_killed_download_leaves_no_staging_folder(tmp_path) -> None:
    import tarfile

    from robench.data.download import install

    stale = tmp_path / f".imagenet-r.extract.{dead_tag()}.x1.tmp"
    (stale / "imagenet-r").mkdir(parents=True)
    (stale / "imagenet-r" / "half.jpg").write_bytes(b"\xff\xd8")
    src = tmp_path / "pkg" / "imagenet-r"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("a")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname="imagenet-r")
    install(archive, tmp_path / "imagenet-r", top="imagenet-r")
    assert not stale.exists() and (tmp_path / "imagenet-r" / "a.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_truncated_analysis_is_recomputed_by_the_run(tmp_path, caplog) -> None:
    import logging
    import shutil

    from robench.analysis import AnalysisSettings, analyze, read_analysis

    src = Path(__file__).resolve().parents[1] / "results" / "quickstart"
    folder = tmp_path / "quickstart"
    for m in ("tiny-clip-cifar10", "tiny-clip-ts"):
        shutil.copytree(src / m, folder / m)
    [(path, doc)] = analyze(tmp_path, AnalysisSettings(mce_baseline="none"))
    path.write_text(path.read_text()[:100])  # a killed writer (or disk) truncated it
    with pytest.raises(RobenchError, match="cannot read") as e:
        read_analysis(folder)  # a reader names it, with the fix
    assert "a run of the suite recomputes it" in e.value.fix
    with caplog.at_level(logging.WARNING):
        [(_, again)] = analyze(tmp_path, AnalysisSettings(mce_baseline="none"))
    assert "it is recomputed" in caplog.text and again["comparisons"] == doc["comparisons"]
    assert read_analysis(folder)["comparisons"] == doc["comparisons"]


def test_a_damaged_c_manifest_is_named_and_rewritten_by_a_generation(tmp_path) -> None:
    from test_bound_entries import source

    from robench.data import cifar_c
    from robench.data.corrupt_set import MANIFEST, generate_c_set

    out = tmp_path / "set"
    base = source("base", 2, n=4)
    generate_c_set(base, out, corruptions=["fog"], workers=1, progress=False)
    fog = (out / "fog.npy").stat().st_ino
    (out / MANIFEST).write_text('{"base": "ba')  # truncated
    with pytest.raises(RobenchError, match="manifest .* is damaged") as e:
        cifar_c.load(out, name="mine")
    assert "--out" in e.value.fix and "a run regenerates" in e.value.fix
    generate_c_set(base, out, corruptions=["fog"], workers=1, progress=False)
    assert (out / "fog.npy").stat().st_ino == fog  # the files were verified and kept
    assert len(cifar_c.load(out, name="mine").groups) == 5
    assert np.load(out / "labels.npy").shape == (20,)
