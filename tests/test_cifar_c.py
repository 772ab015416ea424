"""CIFAR-10-C npy layout and -C sets generated from any dataset (deterministic, resumable)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cifar_pixels, write_cifar10

from robench.data import cifar, cifar_c
from robench.data.corrupt_set import generate_c_set
from robench.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS
from robench.errors import RobenchError


def write_cifar_c(root, n=4, corruptions=CORRUPTIONS):
    """The released layout: <corruption>.npy (5n,32,32,3) uint8 + labels.npy (5n,)."""
    root.mkdir(parents=True)
    x, y = cifar_pixels(n)
    np.save(root / "labels.npy", np.tile(y, 5).astype(np.uint8))
    for k, c in enumerate(corruptions):
        # encode (corruption, severity, image) into the pixels so rows can be identified
        arr = np.zeros((5 * n, 32, 32, 3), np.uint8)
        for s in range(5):
            arr[s * n:(s + 1) * n, 0, 0, 0] = k
            arr[s * n:(s + 1) * n, 0, 0, 1] = s + 1
            arr[s * n:(s + 1) * n, 0, 0, 2] = np.arange(n)
        np.save(root / f"{c}.npy", arr)
    return y


def test_cifar_c_rows_groups_and_labels(tmp_path):
    y = write_cifar_c(tmp_path / "CIFAR-10-C", n=4)
    src = cifar_c.load(tmp_path / "CIFAR-10-C", name="c10c")
    assert len(src) == 19 * 20 and len(src.groups) == 19 * 5
    assert len(src.summary_groups) == 75
    assert all(g.split("/")[0] in STANDARD_CORRUPTIONS for g in src.summary_groups)
    for g in ("gaussian_noise/1", "fog/3", "speckle_noise/5"):
        rows = src.groups[g]
        c, s = g.split("/")
        px = np.stack([np.asarray(src.load_image(i))[0, 0] for i in rows])
        assert (px[:, 0] == CORRUPTIONS.index(c)).all() and (px[:, 1] == int(s)).all()
        np.testing.assert_array_equal(px[:, 2], np.arange(4))  # severity s = rows (s-1)N..sN
        np.testing.assert_array_equal(src.labels[rows], y)
        # row j of every group is a copy of base image j: intervals resample it as one unit
        np.testing.assert_array_equal(src.base_index[rows], px[:, 2])
    std = cifar_c.load(tmp_path / "CIFAR-10-C", name="c10c", corruptions="standard")
    assert len(std.groups) == 75


def test_cifar_c_errors(tmp_path):
    with pytest.raises(RobenchError, match="does not exist"):
        cifar_c.load(tmp_path / "none", name="x")
    write_cifar_c(tmp_path / "c", n=2, corruptions=STANDARD_CORRUPTIONS[:-1])
    with pytest.raises(RobenchError, match="lacks jpeg_compression.npy"):
        cifar_c.load(tmp_path / "c", name="x")
    write_cifar_c(tmp_path / "d", n=2)
    np.save(tmp_path / "d" / "fog.npy", np.zeros((10, 16, 16, 3), np.uint8))
    with pytest.raises(RobenchError, match="fog.npy is uint8"):
        cifar_c.load(tmp_path / "d", name="x")


def test_generated_set_deterministic_across_workers_and_resumable(tmp_path):
    src = cifar.load(write_cifar10(tmp_path / "c10", n_test=12), name="c10")
    names = ("gaussian_noise", "glass_blur", "impulse_noise")
    a = generate_c_set(src, tmp_path / "a", corruptions=names, workers=1, chunk=5,
                       progress=False)
    b = generate_c_set(src, tmp_path / "b", corruptions=names, workers=2, chunk=3,
                       progress=False)
    for c in names:
        np.testing.assert_array_equal(np.load(a / f"{c}.npy"), np.load(b / f"{c}.npy"))
    x, _ = cifar_pixels(12)
    arr = np.load(a / "gaussian_noise.npy")
    assert arr.shape == (60, 32, 32, 3) and not np.array_equal(arr[:12], x)
    np.testing.assert_array_equal(np.load(a / "labels.npy"), np.tile(src.labels, 5))
    # resume: an existing corruption file is kept, a missing one is regenerated identically
    (a / "glass_blur.npy").unlink()
    before = (a / "gaussian_noise.npy").stat().st_mtime_ns
    generate_c_set(src, a, corruptions=names, workers=1, progress=False)
    assert (a / "gaussian_noise.npy").stat().st_mtime_ns == before
    np.testing.assert_array_equal(np.load(a / "glass_blur.npy"), np.load(b / "glass_blur.npy"))
    with pytest.raises(RobenchError, match="other data or parameters"):
        generate_c_set(src, a, corruptions=names, seed=1, progress=False)


def test_folder_layout_for_larger_images_deterministic_and_resumable(tmp_path):
    from PIL import Image

    from robench.data import folder
    from robench.data.corrupt_set import generate_c_folders

    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"img{i}.JPEG")
    src = folder.load(tmp_path / "src", name="mini")
    names = ("gaussian_noise", "zoom_blur")
    a = generate_c_folders(src, tmp_path / "a", corruptions=names, severities=(1, 5), workers=1,
                           chunk=2, progress=False)
    b = generate_c_folders(src, tmp_path / "b", corruptions=names, severities=(1, 5), workers=2,
                           chunk=4, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 2 * 2 * 6
    assert str(files[0]).startswith("gaussian_noise/1/n01440764/")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    victim = a / files[3]
    victim.unlink()
    keep = (a / files[0]).stat().st_mtime_ns
    generate_c_folders(src, a, corruptions=names, severities=(1, 5), workers=1, progress=False)
    assert victim.read_bytes() == (b / files[3]).read_bytes()
    assert (a / files[0]).stat().st_mtime_ns == keep
    with Image.open(victim) as im:
        assert im.size == (48, 40)
