"""Crash safety, concurrency and hostile filesystems: SIGKILL at random moments resumes to the
same records without recomputing finished work; concurrent runs build an entry once; a full
disk or a read-only folder is a named error; files follow the user's umask."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, cell_outputs

from robench.errors import RobenchError

SUITE = (f"models=[{{name: zs, arch: {TINY}}}, {{name: lp, arch: {TINY}, method: linear-probe, "
         "options: {train_on: cifar10-subset-probe, val_on: cifar10-subset-probe, "
         "grid: [0.1, 1.0]}}]",
         "datasets=[cifar10-subset-val, {name: val-c, family: generated-c, root: '', "
         "options: {base: cifar10-subset-val, stride: 100}}]")


def _cmd(tmp: Path) -> list[str]:
    return [sys.executable, "-m", "robench.cli", "run", "suite=smoke", *SUITE,
            "id_dataset=cifar10-subset-val", "metrics.bootstrap=20", "device=cpu",
            "model.num_workers=0", "progress=false", f"cache_dir={tmp / 'c'}",
            f"results_dir={tmp / 'r'}"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _records(tmp: Path) -> dict:
    out = {}
    for rec in sorted((tmp / "r" / "smoke").rglob("*.json")):
        if rec.name == "analysis.json":  # the suite's cross-cell analysis, not a cell
            continue
        out[rec.name, rec.parent.name] = (json.loads(rec.read_text())["metrics"],
                                          cell_outputs(rec))
    return out


def _finished(tmp: Path) -> dict[Path, tuple[int, int]]:
    """Every finished piece of work (sealed cache entries, records), by (inode, mtime): an
    atomic rewrite would give it a new inode."""
    files = [p.with_name(p.name.removesuffix(".sha256")) for p in (tmp / "c").rglob("*.sha256")]
    files += list((tmp / "r").rglob("*.json")) if (tmp / "r").exists() else []
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files
            if f.is_file() and f.name != "ident.json" and "content-index" not in f.parts}


def test_sigkill_at_seeded_random_moments_resumes_to_the_uninterrupted_records(tmp_path):
    ref = tmp_path / "ref"
    t0 = time.time()
    subprocess.run(_cmd(ref), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    duration = time.time() - t0
    want = _records(ref)

    run = tmp_path / "killed"
    rng = random.Random(20261201)
    for _ in range(3):
        before = _finished(run)
        p = subprocess.Popen(_cmd(run), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.9) * duration)
        p.send_signal(signal.SIGKILL)
        p.wait()
        after = _finished(run)
        redone = [str(f) for f, st in before.items() if after.get(f) != st]
        assert not redone, f"finished work was recomputed or lost: {redone}"
    r = subprocess.run(_cmd(run), env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _records(run)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        for f in want[k][1]:
            assert np.array_equal(got[k][1][f], want[k][1][f]), (k, f)
    left = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".partial.npy"))]
    assert not left, f"leftovers of the killed runs: {left}"


# -- concurrency -------------------------------------------------------------------------------
BUILD_ONCE = """
import sys, time
from pathlib import Path
from robench.artifacts import ensure
from robench.io import write_npz
import numpy as np
folder, log = Path(sys.argv[1]), Path(sys.argv[2])
def build():
    with open(log, "a") as f:
        f.write("built\\n")
    time.sleep(1.5)
    write_npz(folder / "head.npz", w=np.ones(3))
ensure(folder, build, "a test artifact")
print((folder / "head.npz").is_file())
"""


def test_concurrent_runs_build_an_artifact_once(tmp_path):
    folder, log = tmp_path / "artifacts" / "kind" / "key", tmp_path / "log.txt"
    folder.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONCE, str(folder), str(log)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["True"] * 3
    assert log.read_text() == "built\n"


def test_stale_temporaries_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    from robench.io import process_tag, sweep_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = process_tag().split("-")[1]
    (tmp_path / "a").mkdir()
    stale = [tmp_path / "a" / f".x.json.{dead}-{host}.k2j3.tmp",
             tmp_path / f"abc.{dead}-{host}.partial.npy"]
    live = tmp_path / f".y.json.{process_tag()}.q1.tmp"
    other_host = tmp_path / f".z.json.{dead}-00000000.q1.tmp"  # another node's: not ours to judge
    for f in [*stale, live, other_host]:
        f.write_text("")
    assert sweep_stale(tmp_path) == 2
    assert not any(f.exists() for f in stale) and live.exists() and other_host.exists()


# -- full disk, read-only folders, umask ---------------------------------------------------------
@pytest.fixture
def small_source():
    from robench.data import folder
    from robench.registry import ASSETS

    return folder.load(ASSETS / "cifar10-subset" / "val", name="val")


def test_a_full_disk_is_named_before_the_memory_map_is_written(tmp_path, monkeypatch,
                                                               tiny_backbone, small_source):
    from robench import io
    from robench.features import extract_features

    monkeypatch.setattr(io, "_free_bytes", lambda folder: 1000)
    with pytest.raises(RobenchError, match="are needed in .* but only 1000 B are free") as e:
        extract_features(tiny_backbone, small_source, tmp_path, num_workers=0, progress=False)
    assert "cache_dir" in e.value.fix
    assert not list((tmp_path / "features").glob("*.npy"))  # no partial file kept

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_free_bytes", lambda folder: None)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(RobenchError, match="no space left on the device holding"):
        extract_features(tiny_backbone, small_source, tmp_path, num_workers=0, progress=False)
    assert not list((tmp_path / "features").glob("*.npy"))


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    from robench import io

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(RobenchError, match="cannot write to .*: Read-only file system") as e:
        io.write_json(tmp_path / "r" / "x.json", {"a": 1})
    assert "writable" in e.value.fix
    assert isinstance(e.value, OSError)  # callers that tolerate a failed optional write still do


UMASK = """
import os, sys
from pathlib import Path
import numpy as np
os.umask(0o002)
from robench.io import entry_lock, write_json, write_npy
d = Path(sys.argv[1])
write_json(d / "a.json", {"x": 1})
write_npy(d / "b.npy", np.zeros(2))
with entry_lock(d / "c"):
    pass
for f in ("a.json", "a.json.sha256", "b.npy", "c.lock"):
    print(f, oct((d / f).stat().st_mode & 0o777))
"""


def test_files_follow_the_users_umask(tmp_path):
    out = subprocess.run([sys.executable, "-c", UMASK, str(tmp_path)], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    modes = dict(zip(out[::2], out[1::2], strict=True))
    assert modes == {"a.json": "0o664", "a.json.sha256": "0o664", "b.npy": "0o664",
                     "c.lock": "0o664"}


CONCURRENT_SUITE = """
description: two runs of one suite on one cache
models: [tiny-random]
datasets:
  - cifar10-subset-val
  - {name: val-c, family: generated-c, root: "", templates: cifar-context,
     options: {base: cifar10-subset-val, stride: 50, corruptions: standard}}
id_dataset: cifar10-subset-val
progress: false
model: {batch_size: 128, num_workers: 0}
"""


@pytest.mark.slow
def test_two_runs_of_one_suite_on_one_cache_score_each_cell_once(tmp_path):
    """The second run waits for the first at each cell and at the generated -C set, then reads
    what the first wrote: every cell is scored once, both runs end with the same records."""
    suite = tmp_path / "s.yaml"
    suite.write_text(CONCURRENT_SUITE)
    args = [sys.executable, "-m", "robench.cli", "run", f"suite={suite}", "device=cpu",
            f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'runs'}"]
    procs = [subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    scored = [ln for out in outs for ln in out.splitlines() if ": acc1=" in ln]
    meanwhile = [ln for out in outs for ln in out.splitlines() if "scored meanwhile" in ln]
    cells = ("tiny-random x cifar10-subset-val", "tiny-random x val-c")
    for cell in cells:  # scored by exactly one run; the other found it done
        assert sum(cell in ln for ln in scored) == 1, outs
    assert len(scored) + len(meanwhile) + sum("already done" in o for o in outs) >= 2
    # a complete, verified cache is read without taking a lock: a third run writes no lock
    locks = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.lock")}
    again = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "2 of 2 cell(s) already done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.lock")} == locks


def test_a_reader_never_deletes_an_entry_a_writer_is_sealing(tmp_path, tiny_backbone):
    """Between a writer's rename and its seal an entry has no checksum yet: a reader without
    the lock sees it as absent and leaves it alone; only the lock holder removes damage."""
    from test_bound_entries import source

    from robench.artifacts import MANIFEST, artifact_dir, intact, seal_artifact
    from robench.features import _cached, bound
    from robench.io import SUM_SUFFIX, write_json, write_npy

    src = source("s", 1)
    npy, meta = tmp_path / "features" / "k.npy", tmp_path / "features" / "k.json"
    write_npy(npy, np.zeros((len(src), 4), np.float32), bound=bound(npy))
    write_json(meta, {"n": len(src), "bad": [], "manifest": src.manifest_hash})  # unsealed yet
    Path(str(meta) + SUM_SUFFIX).unlink()
    assert _cached(npy, meta, src) is None and npy.is_file() and meta.is_file()
    assert _cached(npy, meta, src, repair=True) is None and not npy.exists()  # under the lock
    folder = artifact_dir(tmp_path, "kind", {"a": 1})
    write_json(folder / "w.json", {"w": 1})
    seal_artifact(folder)
    Path(str(folder / MANIFEST) + SUM_SUFFIX).unlink()  # the manifest's seal not written yet
    assert not intact(folder) and (folder / "w.json").is_file()
    assert not intact(folder, repair=True) and not (folder / "w.json").exists()
