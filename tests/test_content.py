"""Content-keyed manifests: a set regenerated in place (same names, same sizes) gets a new manifest
hash and fresh features; a warm run reads no file; a touch keeps the hash."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import run_cli, write_cifar10
from PIL import Image

from robench.data import cifar, cifar_c, content, folder
from robench.data.base import LoadSettings, hash_manifest
from robench.registry import ASSETS

HOUR_NS = 3600 * 10**9


def write_bmp(path, color) -> None:
    """An uncompressed image: its byte size depends on its size in pixels only."""
    Image.new("RGB", (32, 32), color).save(path, format="BMP")


def make_folder(root, n=4) -> None:
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_bmp(root / cls / f"{i}.bmp", (40 * i, 100 * c, 7))


def regenerate_keeping_name_size_and_mtime(path, color) -> None:
    """What `cp -p` / `tar -x` / `rsync -a` of a regenerated file leave: other bytes, the same
    name, size and mtime."""
    st = path.stat()
    write_bmp(path, color)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture()
def no_racy_window(monkeypatch):
    """Files the test has just written are 'racy' for 2 s (see robench.data.content); tests of
    the warm path drop the window instead of sleeping."""
    monkeypatch.setattr(content, "RACY_NS", 0)


def test_regenerated_in_place_changes_the_manifest(tmp_path, no_racy_window):
    make_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    assert first.info["files_hashed"] == 8
    regenerate_keeping_name_size_and_mtime(tmp_path / "d" / "dog" / "2.bmp", (1, 2, 3))
    second = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    assert second.manifest_hash != first.manifest_hash
    assert second.info["files_hashed"] == 1  # only the changed file was read


def test_warm_run_reads_no_file(tmp_path, monkeypatch):
    root = ASSETS / "cifar10-subset" / "val"  # shipped files: old enough not to be racy
    cold = folder.load(root, name="val", settings=LoadSettings(cache_dir=tmp_path))
    assert cold.info["files_hashed"] == 500

    def must_not_read(path):
        raise AssertionError(f"{path} was hashed on a warm run")

    monkeypatch.setattr(content, "sha256_file", must_not_read)
    warm = folder.load(root, name="val", settings=LoadSettings(cache_dir=tmp_path))
    assert warm.info["files_hashed"] == 0 and warm.manifest_hash == cold.manifest_hash


def test_touch_rehashes_and_keeps_the_hash(tmp_path, no_racy_window):
    make_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    before = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    p = tmp_path / "d" / "cat" / "1.bmp"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns - HOUR_NS))
    after = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    assert after.info["files_hashed"] == 1 and after.manifest_hash == before.manifest_hash


def test_added_and_removed_files_hash_only_the_new_ones(tmp_path, no_racy_window):
    make_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    before = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    (tmp_path / "d" / "cat" / "0.bmp").unlink()
    write_bmp(tmp_path / "d" / "dog" / "9.bmp", (9, 9, 9))
    after = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    assert after.info["files_hashed"] == 1 and after.manifest_hash != before.manifest_hash
    at = LoadSettings(cache_dir=cache)
    assert folder.load(tmp_path / "d", name="d", settings=at).info["files_hashed"] == 0


def test_racy_files_are_hashed_again(tmp_path):
    """A file modified just before it was hashed could be rewritten within the same timestamp
    tick; its digest is only trusted once it is older than the racy window."""
    make_folder(tmp_path / "d", n=1)
    cache = tmp_path / "cache"
    at = LoadSettings(cache_dir=cache)
    assert folder.load(tmp_path / "d", name="d", settings=at).info["files_hashed"] == 2
    assert folder.load(tmp_path / "d", name="d", settings=at).info["files_hashed"] == 2


def test_unwritable_cache_still_gives_the_content_hash(tmp_path, caplog, no_racy_window):
    make_folder(tmp_path / "d", n=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the index cannot be created below a file
    a = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=blocker))
    assert "cannot write the content index" in caplog.text
    b = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=tmp_path / "cache"))
    assert a.manifest_hash == b.manifest_hash


def test_npy_sets_hash_every_byte(tmp_path, no_racy_window):
    """A CIFAR-10-C file with one severity block rewritten (same size, first and last MiB
    untouched) gets a new manifest: the full content is hashed, once."""
    rng = np.random.default_rng(0)
    n = 5 * 2000  # 2000 images per severity: 30 MB, more than the first + last MiB
    np.save(tmp_path / "labels.npy", rng.integers(0, 10, n))
    np.save(tmp_path / "fog.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "robench_c.json").write_text(json.dumps({"corruptions": ["fog"]}))
    cache = tmp_path / "cache"
    before = cifar_c.load(tmp_path, name="c", settings=LoadSettings(cache_dir=cache))
    arr = np.load(tmp_path / "fog.npy", mmap_mode="r+")
    arr[2 * 2000:3 * 2000] = 0  # severity 3 regenerated in place
    arr.flush()
    del arr
    after = cifar_c.load(tmp_path, name="c", settings=LoadSettings(cache_dir=cache))
    assert after.manifest_hash != before.manifest_hash
    again = cifar_c.load(tmp_path, name="c", settings=LoadSettings(cache_dir=cache))
    assert again.manifest_hash == after.manifest_hash


def test_cifar_splits_share_one_stable_index(tmp_path, monkeypatch, no_racy_window):
    root = write_cifar10(tmp_path / "c10", n_test=20)
    cache = tmp_path / "cache"
    test = cifar.load(root, name="cifar10", settings=LoadSettings(cache_dir=cache))
    calls = []
    real = content.sha256_file
    monkeypatch.setattr(content, "sha256_file", lambda p: calls.append(p) or real(p))
    train = cifar.load(root, name="cifar10-train", options=cifar.CifarOptions(train=True),
                       settings=LoadSettings(cache_dir=cache))
    again = cifar.load(root, name="cifar10", settings=LoadSettings(cache_dir=cache))
    assert calls == [] and again.manifest_hash == test.manifest_hash != train.manifest_hash


def test_hash_manifest_is_order_free():
    entries = [(f"c/{i}.jpg", i, i % 3, "ab" * 32) for i in range(25_000)]
    assert hash_manifest(entries) == hash_manifest(entries[::-1])
    assert hash_manifest(entries) != hash_manifest(entries[:-1])


SUITE = """
models: [tiny-random]
datasets: [{{name: mine, family: folder, root: {root}}}]
id_dataset: null
model: {{batch_size: 8, num_workers: 0}}
metrics: {{bootstrap: 0}}
"""


def test_run_recomputes_features_of_a_set_regenerated_in_place(tmp_path):
    make_folder(tmp_path / "mine")
    suite = tmp_path / "regen.yaml"
    suite.write_text(SUITE.format(root=tmp_path / "mine"))
    args = ("run", f"suite={suite}", f"cache_dir={tmp_path / 'cache'}",
            f"results_dir={tmp_path / 'results'}", "device=cpu", "progress=false")
    rec_path = tmp_path / "results" / "regen" / "tiny-random" / "mine.json"
    assert run_cli(*args).returncode == 0
    first = json.loads(rec_path.read_text())
    regenerate_keeping_name_size_and_mtime(tmp_path / "mine" / "dog" / "2.bmp", (250, 0, 250))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "already done" not in r.stdout  # the cell is stale, not done
    second = json.loads(rec_path.read_text())
    assert second["data"]["manifest_hash"] != first["data"]["manifest_hash"]
    assert second["data"]["feature_key"] != first["data"]["feature_key"]
    old, new = (np.load(tmp_path / "cache" / "features" / f"{rec['data']['feature_key']}.npy")
                for rec in (first, second))
    changed = np.flatnonzero((old != new).any(axis=1))
    assert changed.tolist() == [6]  # dog/2.bmp, and only it, has new features
    assert "already done" in run_cli(*args).stdout  # and now it is done


def test_unreadable_file_is_not_fatal_and_is_retried(tmp_path, monkeypatch, no_racy_window):
    make_folder(tmp_path / "d", n=2)
    cache = tmp_path / "cache"
    real = content.sha256_file

    def flaky(path):
        if path.name == "1.bmp" and path.parent.name == "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(content, "sha256_file", flaky)
    broken = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    monkeypatch.setattr(content, "sha256_file", real)
    fixed = folder.load(tmp_path / "d", name="d", settings=LoadSettings(cache_dir=cache))
    assert fixed.info["files_hashed"] == 1  # only the file that could not be read
    assert fixed.manifest_hash != broken.manifest_hash
    other = LoadSettings(cache_dir=tmp_path / "other")
    assert fixed.manifest_hash == folder.load(tmp_path / "d", name="d",
                                              settings=other).manifest_hash
