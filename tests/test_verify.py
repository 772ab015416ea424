"""``robench data verify`` on fixtures in the released layouts: what it accepts, and how precisely
it says what is wrong (layout, counts, class folders, unreadable files, manifest changes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_cifar10
from test_imagenet import imagenet_samples, make_folder_set, make_v2

from robench.data import imagenet
from robench.data import verify as V  # noqa: N812
from robench.data.corruptions import STANDARD_CORRUPTIONS
from robench.registry import DATASETS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return imagenet_samples(tmp_path_factory.mktemp("images"))


def write_c(root: Path, n_classes: int, per_severity: int) -> Path:
    """A -C set in the released npy layout: 15 standard corruption files + labels.npy."""
    root.mkdir(parents=True)
    labels = np.arange(per_severity) % n_classes
    np.save(root / "labels.npy", np.tile(labels, 5))
    x = np.random.default_rng(0).integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8)
    for c in STANDARD_CORRUPTIONS:
        np.save(root / f"{c}.npy", x)
    return root


def build(name: str, tmp: Path, samples: list) -> Path:
    """The fixture of dataset ``name`` under ``tmp``; returns the root to verify."""
    if name == "imagenet":
        return make_folder_set(tmp / "imagenet" / "val", samples)
    if name.startswith("imagenet-v2"):
        make_v2(tmp / "imagenetv2-matched-frequency-format-val", samples)
        return tmp  # the folder the tar was extracted into
    if name in ("imagenet-r", "imagenet-a"):
        return make_folder_set(tmp / name, samples, set(imagenet.subset_wnids(name)), ".jpg")
    if name == "imagenet-sketch":
        make_folder_set(tmp / "imagenet-sketch" / "sketch", samples)
        return tmp / "imagenet-sketch"
    if name == "cifar10-c":
        return write_c(tmp / "CIFAR-10-C", 10, 20)
    if name == "cifar100-c":
        return write_c(tmp / "CIFAR-100-C", 100, 100)
    raise AssertionError(name)


def run(name: str, root: Path, cache: Path, n_expected: int | None = -1, **kw) -> V.VerifyReport:
    spec = DATASETS[name]
    if n_expected != -1:
        spec = replace(spec, n_expected=n_expected)
    report = V.verify_dataset(name, spec, root, cache_dir=cache, progress=False, workers=2, **kw)
    print(report.render())
    return report


def status(report: V.VerifyReport, what: str) -> list[str]:
    return [c.status for c in report.checks if c.what == what]


def detail(report: V.VerifyReport, what: str) -> str:
    return " | ".join(c.detail + (f" fix: {c.fix}" if c.fix else "")
                      for c in report.checks if c.what == what)


FIXTURE_SIZES = {"imagenet": 1000, "imagenet-v2-matched-frequency": 1000, "imagenet-r": 200,
                 "imagenet-a": 200, "imagenet-sketch": 1000, "cifar10-c": 15 * 100,
                 "cifar100-c": 15 * 500}  # the 1000-class sets: one (real) image per class


@pytest.mark.parametrize("name", list(FIXTURE_SIZES))
def test_verify_accepts_each_released_layout(tmp_path, samples, name):
    root = build(name, tmp_path, samples)
    cache = tmp_path / "cache"
    n = FIXTURE_SIZES[name]
    decode = None if n <= 200 else 200  # real ImageNet JPEGs decode at ~300/s here
    report = run(name, root, cache, n_expected=n, sample=decode)
    assert report.ok, report.render()
    assert status(report, "layout")[0] == "ok" and status(report, "count") == ["ok"]
    assert status(report, "classes") == ["ok"] and status(report, "readable") == ["ok"]
    assert f"{decode or n} of {decode or n} images decoded" in detail(report, "readable")
    if name in ("imagenet-r", "imagenet-a"):
        assert "scored over the 200 ImageNet-" in detail(report, "layout")
    if name.endswith("-c"):  # only the 15 standard corruption files in the fixture
        assert "4 of the 19 corruption files are absent" in detail(report, "layout")
        real = run(name, root, cache, sample=0)  # the registered 19 x 50000, scaled to 15 files
        assert f"expected {15 * 50000} for the 15 corruption files present" in \
            detail(real, "count")
    manifest = report.root / V.MANIFEST_NAME
    assert manifest.is_file() and "written" in detail(report, "manifest")
    again = run(name, root, cache, n_expected=FIXTURE_SIZES[name], sample=5)
    assert again.ok and "unchanged since" in detail(again, "manifest")
    assert "a random sample of 5 (seed 0)" in detail(again, "readable")
    recorded = json.loads(manifest.read_text())
    assert recorded["datasets"][name]["source_manifest_hash"] == report.source.manifest_hash


def test_registered_counts_are_checked(tmp_path, samples):
    report = run("imagenet-r", build("imagenet-r", tmp_path, samples), tmp_path / "c")
    assert status(report, "count") == ["FAIL"]
    assert "200 samples, expected 30000 (29800 missing)" in detail(report, "count")
    assert "robench data download imagenet-r --force" in detail(report, "count")
    assert status(report, "manifest") == ["warn"]  # not written for broken data
    assert not (report.root / V.MANIFEST_NAME).exists()


def test_v2_with_wnid_folders_is_explained(tmp_path, samples):
    root = make_folder_set(tmp_path / "v2", samples[:20])
    report = run("imagenet-v2-matched-frequency", root, tmp_path / "c")
    assert not report.ok and status(report, "layout") == ["FAIL"]
    assert "imagenet-v2 folders are wnids; expected 0..999" in detail(report, "layout")
    assert "family: imagenet-folder" in detail(report, "layout")


def test_missing_class_folder_and_stray_files(tmp_path, samples):
    wnids = sorted(imagenet.subset_wnids("imagenet-a"))
    root = make_folder_set(tmp_path / "a", samples, set(wnids[1:]), ".jpg")
    (root / wnids[5] / "README.txt").write_text("x")
    report = run("imagenet-a", root, tmp_path / "c", n_expected=199)
    assert status(report, "classes") == ["FAIL"]
    assert f"1 of 200 class folders missing: {wnids[0]}" in detail(report, "classes")
    assert status(report, "files") == ["warn"] and "README.txt" in detail(report, "files")


def test_unreadable_images_are_named(tmp_path, samples):
    root = tmp_path / "val"
    for wnid, _, path in samples[:6]:
        (root / wnid).mkdir(parents=True)
        shutil.copyfile(path, root / wnid / path.name)
    bad = root / samples[2][0] / samples[2][2].name
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated download
    (root / samples[4][0] / "empty.JPEG").write_bytes(b"")
    report = run("imagenet", root, tmp_path / "c", n_expected=7)
    assert status(report, "readable") == ["FAIL"]
    d = detail(report, "readable")
    assert "2 of 7 images could not be decoded" in d
    assert f"{samples[2][0]}/{bad.name}" in d and f"{samples[4][0]}/empty.JPEG" in d
    sampled = run("imagenet", root, tmp_path / "c", n_expected=7, sample=0)
    assert status(sampled, "readable") == ["warn"]


def test_manifest_reports_changes_until_accepted(tmp_path, samples):
    root = make_folder_set(tmp_path / "r", samples, set(imagenet.subset_wnids("imagenet-r")))
    cache = tmp_path / "c"

    def verify(**kw) -> V.VerifyReport:
        return run("imagenet-r", root, cache, n_expected=None, sample=2, **kw)

    assert verify().ok
    w0 = sorted(imagenet.subset_wnids("imagenet-r"))[0]
    added = root / w0 / "added.JPEG"
    shutil.copyfile(samples[0][2], added)
    changed = verify()
    assert status(changed, "manifest") == ["FAIL"]
    d = detail(changed, "manifest")
    assert f"the data changed: the manifest {root / V.MANIFEST_NAME} was recorded on" in d
    assert f"now: 1 file(s) added ({w0}/added.JPEG)" in d and "--accept" in d
    assert not verify().ok  # reported until accepted
    accepted = verify(accept=True)
    assert accepted.ok and "re-recorded after --accept" in detail(accepted, "manifest")
    assert verify().ok
    data = added.read_bytes()
    added.unlink()
    assert f"1 file(s) removed ({w0}/added.JPEG)" in detail(verify(), "manifest")
    added.write_bytes(data + b"\0")
    assert f"1 file(s) changed size ({w0}/added.JPEG)" in detail(verify(), "manifest")


def test_broken_layout_still_reports_the_change(tmp_path, samples):
    root = make_folder_set(tmp_path / "a", samples, set(imagenet.subset_wnids("imagenet-a")))
    assert run("imagenet-a", root, tmp_path / "c", n_expected=200, sample=2).ok
    (root / imagenet.subset_wnids("imagenet-a")[0]).rename(root / "0")
    report = run("imagenet-a", root, tmp_path / "c", n_expected=200, sample=2)
    assert status(report, "layout") == ["FAIL"] and status(report, "manifest") == ["FAIL"]
    assert "the folder changed since it was verified" in detail(report, "manifest")


def test_read_only_root_keeps_the_manifest_in_the_cache(tmp_path, samples, monkeypatch):
    root = make_folder_set(tmp_path / "r", samples, set(imagenet.subset_wnids("imagenet-r")),
                           ".jpg")
    cache = tmp_path / "cache"
    real_write = V._write_json

    def read_only(path: Path, obj: dict) -> None:
        if path.parent == root:
            raise PermissionError(13, "Read-only file system")
        real_write(path, obj)

    monkeypatch.setattr(V, "_write_json", read_only)
    report = run("imagenet-r", root, cache, n_expected=200)
    assert report.ok and "the dataset folder is read-only" in detail(report, "manifest")
    assert report.manifest_path.parent == cache / "manifests"
    assert not (root / V.MANIFEST_NAME).exists()
    monkeypatch.setattr(V, "_write_json", real_write)
    again = run("imagenet-r", root, cache, n_expected=200)
    assert "unchanged since" in detail(again, "manifest") and str(cache) in \
        detail(again, "manifest")


def test_cifar_pickles_are_md5_checked(tmp_path):
    root = write_cifar10(tmp_path / "cifar10", n_test=20)
    report = run("cifar10", root, tmp_path / "c", n_expected=20)
    assert status(report, "checksum") == ["FAIL"]  # fixture bytes are not the release's
    assert "md5 mismatch for data_batch_1" in detail(report, "checksum")


def test_cifar100_labels_under_a_cifar10_name(tmp_path):
    root = write_c(tmp_path / "CIFAR-10-C", 100, 100)
    report = run("cifar10-c", root, tmp_path / "c", n_expected=1500)
    assert status(report, "layout") == ["FAIL"]  # refused when read, before any other check
    assert "is this CIFAR-100-C under a CIFAR-10-C name?" in detail(report, "layout")


# -- the command line ---------------------------------------------------------------------------
def test_cli_verify(tmp_path, samples, capsys, monkeypatch):
    from robench.cli import main

    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    root = build("imagenet-a", tmp_path, samples)
    assert main(["data", "verify", "imagenet-a", "--root", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  count     200 samples, expected 7500" in out and "=> imagenet-a: 1 problem" in out

    monkeypatch.setenv("ROBENCH_DATA", str(tmp_path))
    assert main(["data", "verify", "--suite", "imagenet-shifts", "imagenet-a",
                 f"data.imagenet-a.root={root}", "--sample", "3", "--no-progress"]) == 1
    assert "a random sample of 3" in capsys.readouterr().out

    for args, needle in [
        (["imagenet-aa"], "Did you mean 'imagenet-a'"),
        (["imagenet", "imagenet-a", "--root", str(root)], "--root applies to exactly one"),
        (["imagenet", "data.x=1"], "need --suite"),
        ([], "no dataset named"),
    ]:
        assert main(["data", "verify", *args]) == 2
        assert needle in capsys.readouterr().err


def test_verify_a_generated_c_set_before_and_after_a_run_made_it(tmp_path, capsys, monkeypatch):
    """`robench data verify --suite S` over a suite with a -C set generated on demand: before the
    first run it says the set is not made yet (not an error); once made, it is verified in the
    cache like a released -C set."""
    from robench.cli import main
    from robench.data import load_dataset
    from robench.data.base import LoadSettings
    from robench.registry import DATASETS, dataset_root

    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    suite = tmp_path / "gen.yaml"
    suite.write_text("models: [tiny-random]\n"
                     "datasets: [{name: val-c, family: generated-c, root: '', "
                     "options: {base: cifar10-subset-val, stride: 50}}]\n")
    args = ["data", "verify", "--suite", str(suite), "--sample", "20", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "generated not generated yet" in out and "=> val-c: OK" in out

    def source_of(name):  # as the runner reads datasets
        spec = DATASETS[name]
        return load_dataset(spec.family, dataset_root(name, spec, "data", {}), name)

    load_dataset("generated-c", Path(""), "val-c", {"base": "cifar10-subset-val", "stride": 50},
                 LoadSettings(cache_dir=str(tmp_path / "cache"), source_of=source_of))
    assert main(args) == 0
    out = capsys.readouterr().out.split("val-c  (root ")[1]
    assert "every 50th of the 500 images of cifar10-subset-val" in out
    assert "protocol cifar-c), in the cache; not a released -C set" in out
    assert "count     750 samples" in out and "10 of 10 classes present" in out
    assert "warn" not in out  # the 15 standard corruptions are all it was asked for
    assert "20 of 20 images decoded" in out and "=> val-c: OK" in out


def test_cli_verify_stays_light(tmp_path, samples):
    """`robench data verify` on an ImageNet folder never imports torch or open_clip."""
    root = make_folder_set(tmp_path / "val", samples[:10])
    code = ("import sys; from robench.cli import main; "
            f"rc = main(['data', 'verify', 'imagenet', '--root', {str(root)!r}, '--no-progress', "
            f"'--cache-dir', {str(tmp_path / 'c')!r}]); "
            "print('heavy:', sorted(m for m in ('torch', 'open_clip', 'torchvision') "
            "if m in sys.modules)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 1, r.stderr  # 10 images, not 50000
    assert "heavy: []" in r.stdout and "10 of 10 images decoded" in r.stdout
