"""`robench data corrupt`: any registered dataset -> a -C set in the released layouts, read back
by the same loaders as CIFAR-10-C / ImageNet-C, deterministic, resumable, with clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_NAMES, REALDATA, REPO
from PIL import Image

from robench.data import cifar_c, imagenet, imagenet_c
from robench.data.corruptions import SEVERITIES, STANDARD_CORRUPTIONS
from robench.errors import RobenchError
from robench.registry import ASSETS

VAL = ASSETS / "cifar10-subset" / "val"


def robench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "robench.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "robench_c.json"}


def val_labels() -> np.ndarray:
    classes = sorted(p.name for p in VAL.iterdir() if p.is_dir())
    return np.asarray([i for i, c in enumerate(classes) for _ in sorted((VAL / c).iterdir())])


@pytest.fixture(scope="module")
def npy_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c") / "val-c"
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(out),
                "--stride", "25", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "npy layout, 1500 images, protocol cifar-c, resize none" in r.stdout
    assert "not the released CIFAR-10-C" in r.stdout
    # the printed declaration names it as generated, never as the released set
    assert "name: cifar10-subset-val-generated-c, family: cifar-c" in r.stdout
    return out


def test_npy_layout_reads_back_as_cifar_c(npy_set: Path) -> None:
    src = cifar_c.load(npy_set, name="val-c")
    rows = np.arange(0, 500, 25)
    assert len(src) == 15 * 5 * len(rows)
    assert src.classnames == CIFAR10_NAMES  # from the manifest, not guessed
    assert set(src.groups) == {f"{c}/{s}" for c in STANDARD_CORRUPTIONS for s in SEVERITIES}
    np.testing.assert_array_equal(src.labels[src.groups["fog/3"]], val_labels()[rows])
    # row k of severity s is image rows[k], corrupted: close to the clean pixels, not equal
    clean = np.asarray(Image.open(sorted((VAL / "airplane").iterdir())[0]).convert("RGB"))
    light = np.asarray(src.load_image(int(src.groups["brightness/1"][0])), dtype=int)
    assert 0 < np.abs(light - clean).mean() < 40


def test_same_pixels_for_any_worker_count_and_as_the_runners_generated_set(
        npy_set: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(one),
                "--stride", "25", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert digests(one) == digests(npy_set)
    # the generated-c family (what a suite uses) writes the very same pixels
    from robench.data.base import LoadSettings
    from robench.data.generated_c import GeneratedCOptions
    from robench.data.generated_c import load as generated

    def source_of(name: str):
        from robench.data.folder import load

        return load(VAL, name=name)

    gen = generated(Path(""), "g", GeneratedCOptions(base="cifar10-subset-val", stride=25),
                    LoadSettings(cache_dir=str(tmp_path / "cache"), source_of=source_of))
    for c in ("gaussian_noise", "glass_blur", "frost"):
        a = np.load(npy_set / f"{c}.npy")
        b = np.load(Path(gen.info["root"]) / f"{c}.npy")
        np.testing.assert_array_equal(a, b)


def test_resume_regenerates_only_what_is_missing(npy_set: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(npy_set, out)
    before = digests(out)
    kept = out / "fog.npy"
    mtime = kept.stat().st_mtime_ns
    (out / "snow.npy").unlink()
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(out),
                "--stride", "25", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert digests(out) == before
    assert kept.stat().st_mtime_ns == mtime  # finished files are not rewritten
    # other parameters into the same folder are refused, not mixed
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(out),
                "--stride", "25", "--seed", "1", "--no-progress")
    assert r.returncode != 0 and "other data or parameters" in r.stderr


def test_a_chosen_subset_of_corruptions(tmp_path: Path) -> None:
    out = tmp_path / "two"
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(out),
                "--stride", "50", "--corruptions", "gaussian_noise,spatter", "--no-progress")
    assert r.returncode == 0, r.stderr
    src = cifar_c.load(out, name="two", options=cifar_c.CifarCOptions(corruptions="all"))
    assert src.info["corruptions"] == ["gaussian_noise", "spatter"]
    assert src.summary_groups == [f"gaussian_noise/{s}" for s in SEVERITIES]
    # a later call adds to the set instead of forgetting what is there
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(out),
                "--stride", "50", "--corruptions", "fog", "--no-progress")
    assert r.returncode == 0, r.stderr
    src = cifar_c.load(out, name="two", options=cifar_c.CifarCOptions(corruptions="all"))
    assert src.info["corruptions"] == ["gaussian_noise", "fog", "spatter"]
    with pytest.raises(RobenchError, match="shot_noise.npy"):
        (out / "robench_c.json").unlink()  # without its manifest it must be a full release
        cifar_c.load(out, name="two")


def test_run_scores_a_generated_set_with_the_printed_declaration(npy_set: Path,
                                                                 tmp_path: Path) -> None:
    decl = (f"{{name: val-c, family: cifar-c, root: {npy_set}, templates: cifar}}")
    r = robench("run", "suite=quickstart", "models=[tiny-clip-cifar10]", f"datasets=[{decl}]",
                "id_dataset=null", f"results_dir={tmp_path / 'runs'}",
                f"cache_dir={tmp_path / 'cache'}", "progress=false")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "runs" / "quickstart" / "tiny-clip-cifar10" / "val-c.json")
                     .read_text())
    assert rec["data"]["n"] == 1500 and len(rec["groups"]) == 75
    assert 10 < rec["metrics"]["acc1"] < 90
    # the record says what the set is, from the set's manifest
    made = rec["data"]["generated"]
    assert (made["protocol"], made["resize"], made["base"]) == ("cifar-c", "none",
                                                                "cifar10-subset-val")


# -- larger images: the ImageNet-C folder layout -------------------------------------------------
def imagenet_fixture(root: Path, k: int = 3) -> list[tuple[str, int]]:
    """``root/<wnid>/<file>.JPEG`` with k classes of 64x64 images: real ImageNet pixels when
    shared/realdata is present, else noise."""
    index = REALDATA / "imagenet" / "sample_1k_index.csv"
    rng = np.random.default_rng(0)
    picks: list[tuple[str, int, Image.Image]] = []
    if index.is_file():
        with open(index) as f:
            rows = list(csv.DictReader(f))[100:100 + k]
        for r in rows:
            img = Image.open(REALDATA / "imagenet" / "sample_1k" / r["file"]).convert("RGB")
            picks.append((r["wnid"], int(r["class_index"]), img.resize((64, 64))))
    else:
        for label in (100, 101, 102)[:k]:
            wnid = imagenet.imagenet_wnids()[label]
            px = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            picks.append((wnid, label, Image.fromarray(px)))
    for wnid, _, img in picks:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        img.save(root / wnid / f"{wnid}_0.JPEG", quality=95)
    return [(w, y) for w, y, _ in picks]


def test_folder_layout_reads_back_as_imagenet_c(tmp_path: Path) -> None:
    src_root, out = tmp_path / "val", tmp_path / "imagenet-c"
    classes = imagenet_fixture(src_root)
    r = robench("data", "corrupt", "--from", "imagenet", "--root", str(src_root), "--out",
                str(out), "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "folders layout, 225 images, protocol imagenet-c, resize 256-crop-224" in r.stdout
    assert "family: imagenet-c" in r.stdout and "not the released ImageNet-C" in r.stdout
    # suggested under its own name: a generated set is never declared as "imagenet-c"
    assert "name: imagenet-generated-c," in r.stdout and "name: imagenet-c," not in r.stdout
    wnid, label = classes[0]
    assert (out / "gaussian_noise" / "3" / wnid / f"{wnid}_0.JPEG").is_file()
    c = imagenet_c.load(out, name="mine")
    assert len(c) == 225 and len(c.groups) == 75 and len(c.summary_groups) == 75
    assert len(c.classnames) == 1000
    assert sorted(set(c.labels.tolist())) == sorted(y for _, y in classes)  # 1k wnid indices
    # ImageNet-C's preparation by default: 64x64 -> shorter side 256 -> centre crop 224
    assert c.load_image(0).size == (224, 224)
    assert c.info["generated"]["resize"] == "256-crop-224"
    assert json.loads((out / "robench_c.json").read_text())["protocol"] == "imagenet-c"
    # bit-identical with one worker
    again = tmp_path / "again"
    r = robench("data", "corrupt", "--from", "imagenet", "--root", str(src_root), "--out",
                str(again), "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert digests(again) == digests(out)
    # native resolution on request, recorded as such
    native = tmp_path / "native"
    r = robench("data", "corrupt", "--from", "imagenet", "--root", str(src_root), "--out",
                str(native), "--resize", "none", "--corruptions", "fog", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "protocol imagenet-c, resize none" in r.stdout
    n = imagenet_c.load(native, name="native",
                        options=imagenet_c.ImageNetCOptions(corruptions="all"))
    assert n.load_image(0).size == (64, 64) and n.info["generated"]["resize"] == "none"
    # the registered imagenet-c entry reads it; verify flags it as far from a full release
    # and says it is generated
    r = robench("data", "verify", "imagenet-c", "--root", str(out), "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not the released ImageNet-C" in r.stdout
    assert "ok    layout" in r.stdout and "225 of 225 images decoded" in r.stdout
    assert "225 samples, expected 3750000" in r.stdout
    assert "997 of 1000 classes have no images" in r.stdout


def test_released_imagenet_c_layout_needs_the_standard_corruptions(tmp_path: Path) -> None:
    wnid = imagenet.imagenet_wnids()[7]
    for s in SEVERITIES:
        d = tmp_path / "gaussian_noise" / str(s) / wnid
        d.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(d / "a.JPEG")
    with pytest.raises(RobenchError, match="shot_noise") as e:
        imagenet_c.load(tmp_path, name="imagenet-c")
    assert "extract every ImageNet-C archive" in e.value.fix
    with pytest.raises(RobenchError, match="does not exist"):
        imagenet_c.load(tmp_path / "nope", name="imagenet-c")


def test_corrupt_errors(tmp_path: Path, npy_set: Path) -> None:
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(tmp_path / "x"),
                "--corruptions", "gausian_noise")
    assert r.returncode != 0 and "gaussian_noise" in r.stderr  # closest valid name offered
    r = robench("data", "corrupt", "--from", "imagenet", "--root", str(tmp_path / "missing"),
                "--out", str(tmp_path / "y"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = robench("data", "corrupt", "--from", "cifar10-subset-test-c", "--out",
                str(tmp_path / "z"), "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode != 0 and "itself a -C set" in r.stderr
    r = robench("data", "corrupt", "--from", "imagenett", "--out", str(tmp_path / "w"))
    assert r.returncode != 0 and "imagenet" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()
    # protocol and resize: problem + fix, exit 2, the valid values named, nothing written
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(tmp_path / "p"),
                "--protocol", "cifar10-c")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "imagenet-c" in r.stderr and "cifar-c" in r.stderr and "fix:" in r.stderr
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(tmp_path / "q"),
                "--resize", "256-crop-224")
    assert r.returncode == 2 and "--resize none" in r.stderr  # the npy layout is 32x32
    r = robench("data", "corrupt", "--from", "cifar10-subset-val", "--out", str(tmp_path / "q"),
                "--resize", "half")
    assert r.returncode == 2 and "256-crop-224" in r.stderr and "none" in r.stderr
    src_root = tmp_path / "val"
    imagenet_fixture(src_root, k=1)
    r = robench("data", "corrupt", "--from", "imagenet", "--root", str(src_root), "--out",
                str(tmp_path / "r"), "--protocol", "cifar-c", "--resize", "none")
    assert r.returncode == 2 and "32x32 images only" in r.stderr and "64x64" in r.stderr
    assert not any((tmp_path / d).exists() for d in "pqr")
    assert json.loads((npy_set / "robench_c.json").read_text())["base"] == "cifar10-subset-val"


def test_cifar10_c_suite_on_a_set_made_by_corrupt(tmp_path: Path) -> None:
    """suites/cifar10-c.yaml end to end: CIFAR-10 in torchvision's layout, its -C set written by
    `robench data corrupt` where the suite expects the released CIFAR-10-C."""
    from conftest import write_cifar10

    data = tmp_path / "data"
    write_cifar10(data / "cifar10", n_test=40)
    r = robench("data", "corrupt", "--from", "cifar10", "--data-root", str(data), "--out",
                str(data / "CIFAR-10-C"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = robench("data", "verify", "--suite", "cifar10-c", f"data_root={data}", "--no-progress")
    assert r.returncode == 1 and "40 samples, expected 10000" in r.stdout  # a 40-image fixture
    assert "3000 samples, expected 750000 for the 15 corruption files present" in r.stdout
    r = robench("run", "suite=cifar10-c", "models=[tiny-random]", f"data_root={data}",
                f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'r'}",
                "metrics.bootstrap=0", "progress=false")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r" / "cifar10-c" / "tiny-random" / "cifar10-c.json").read_text())
    assert rec["data"]["n"] == 40 * 75 and len(rec["groups"]) == 75
    assert rec["protocol"]["id_dataset"] == "cifar10" and rec["metrics"]["ood_auroc"] is not None


def test_help_and_listing_say_generated_sets_are_not_the_benchmarks() -> None:
    r = robench("data", "corrupt", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--protocol" in text and "--resize" in text and "256-crop-224" in text
    assert "GENERATED set, not the released CIFAR-10-C or ImageNet-C" in text
    assert "never 'imagenet-c'" in text
    r = robench("list", "datasets")
    line = next(x for x in r.stdout.splitlines() if x.startswith("cifar10-subset-test-c "))
    assert "GENERATED, not the released CIFAR-10-C" in line and "cifar-c" in line
    # the ImageNet-C download help no longer suggests generating into imagenet-c's own folder
    r = robench("data", "download", "imagenet-c", "--data-root", "/nonexistent-robench")
    assert r.returncode == 2 and "corrupt --from imagenet --out DIR" in r.stderr
    assert "--out /nonexistent-robench/imagenet-c" not in r.stderr
