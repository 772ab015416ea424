"""CIFAR-10-C npy layout and -C sets generated from any dataset (deterministic, resumable)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import cifar_pixels, write_cifar10

from robench.data import cifar, cifar_c
from robench.data.base import LoadSettings
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
    std = cifar_c.load(tmp_path / "CIFAR-10-C", name="c10c",
                       options=cifar_c.CifarCOptions(corruptions="standard"))
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
    # native resolution (the default resizes to 256 / crops 224 first: see the test below)
    a = generate_c_folders(src, tmp_path / "a", corruptions=names, severities=(1, 5), workers=1,
                           chunk=2, progress=False, resize="none")
    b = generate_c_folders(src, tmp_path / "b", corruptions=names, severities=(1, 5), workers=2,
                           chunk=4, progress=False, resize="none")
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 2 * 2 * 6
    assert str(files[0]).startswith("gaussian_noise/1/n01440764/")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    victim = a / files[3]
    victim.unlink()
    keep = (a / files[0]).stat().st_mtime_ns
    generate_c_folders(src, a, corruptions=names, severities=(1, 5), workers=1, progress=False,
                       resize="none")
    assert victim.read_bytes() == (b / files[3]).read_bytes()
    assert (a / files[0]).stat().st_mtime_ns == keep
    with Image.open(victim) as im:
        assert im.size == (48, 40)


# -- protocols and the resize rule --------------------------------------------------------------
def mini_folder(root, size=(40, 48), n=3):
    """Two wnid classes of n random RGB images of ``size`` (height, width)."""
    from PIL import Image

    from robench.data import folder

    rng = np.random.default_rng(1)
    for cls in ("n01440764", "n01443537"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                root / cls / f"img{i}.JPEG")
    return folder.load(root, name="mini")


def test_npy_set_records_its_protocol_and_reads_back_as_generated(tmp_path):
    from robench.data.corrupt_set import read_manifest

    src = cifar.load(write_cifar10(tmp_path / "c10", n_test=6), name="c10")
    names = ("gaussian_noise",)
    auto = generate_c_set(src, tmp_path / "auto", corruptions=names, workers=1, progress=False)
    man = read_manifest(auto)
    assert man["protocol"] == "cifar-c" and man["resize"] == "none"  # auto, resolved
    assert "not the released CIFAR-10-C" in man["note"]
    info = cifar_c.load(auto, name="g",
                        options=cifar_c.CifarCOptions(corruptions="all")).info["generated"]
    assert info["protocol"] == "cifar-c" and info["base"] == "c10" and info["resize"] == "none"
    inc = generate_c_set(src, tmp_path / "inc", corruptions=names, workers=1, progress=False,
                         protocol="imagenet-c")
    assert read_manifest(inc)["protocol"] == "imagenet-c"
    # same seeds, other constants: imagenet-c's sigma is twice CIFAR-10-C's at severity 1
    x, _ = cifar_pixels(6)
    noise = {p: (np.load(d / "gaussian_noise.npy")[:6].astype(float) - x).std()
             for p, d in (("cifar", auto), ("imagenet", inc))}
    assert noise["imagenet"] > 1.5 * noise["cifar"]
    # a resume with the other protocol is refused, not mixed
    with pytest.raises(RobenchError, match="other data or parameters"):
        generate_c_set(src, auto, corruptions=names, progress=False, protocol="imagenet-c")
    # the released layout (no manifest) is not generated
    write_cifar_c(tmp_path / "released", n=2)
    assert cifar_c.load(tmp_path / "released", name="r").info["generated"] is None


def test_resize_256_crop_224_is_torchvisions_resize_and_center_crop():
    import torchvision.transforms as T
    from PIL import Image

    from robench.data.corrupt_set import resize_256_crop_224

    rng = np.random.default_rng(2)
    tv = T.Compose([T.Resize(256), T.CenterCrop(224)])  # make_imagenet_c.py's preparation
    for h, w in ((375, 500), (500, 333), (256, 300), (257, 257), (40, 48), (224, 999)):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out = resize_256_crop_224(img)
        assert out.size == (224, 224)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(tv(img)), err_msg=f"{h}x{w}")


def test_folder_layout_resizes_like_imagenet_c_by_default(tmp_path):
    from PIL import Image

    from robench.data import imagenet_c
    from robench.data.corrupt_set import generate_c_folders, read_manifest

    src = mini_folder(tmp_path / "src")
    out = generate_c_folders(src, tmp_path / "c", corruptions=("contrast",), workers=1,
                             progress=False)
    man = read_manifest(out)
    assert man["protocol"] == "imagenet-c" and man["resize"] == "256-crop-224"
    assert "not the released ImageNet-C" in man["note"] and "Resize(256)" in man["note"]
    f = next(out.rglob("*.JPEG"))
    with Image.open(f) as im:
        assert im.size == (224, 224)
    info = imagenet_c.load(out, name="mini-c",
                           options=imagenet_c.ImageNetCOptions(corruptions="all")).info["generated"]
    assert info == {"protocol": "imagenet-c", "resize": "256-crop-224", "base": "mini",
                    "seed": 0, "note": man["note"]}
    # 32x32 images in the folder layout: auto is CIFAR-10-C's protocol at the native size
    small = mini_folder(tmp_path / "small", size=(32, 32), n=1)
    out = generate_c_folders(small, tmp_path / "c32", corruptions=("contrast",), workers=1,
                             progress=False)
    assert (read_manifest(out)["protocol"], read_manifest(out)["resize"]) == ("cifar-c", "none")
    with Image.open(next(out.rglob("*.JPEG"))) as im:
        assert im.size == (32, 32)


def test_protocol_and_resize_errors_name_the_valid_values(tmp_path):
    from robench.data.corrupt_set import generate_c_folders

    src = mini_folder(tmp_path / "src")
    with pytest.raises(RobenchError, match="imagenet-c") as e:
        generate_c_folders(src, tmp_path / "a", protocol="cifar10", progress=False)
    assert "cifar-c" in str(e.value)
    with pytest.raises(RobenchError, match="32x32") as e:  # 40x48 images: refused by name
        generate_c_folders(src, tmp_path / "b", protocol="cifar-c", resize="none",
                           progress=False)
    assert "mini (image 0) is 40x48" in e.value.problem
    with pytest.raises(RobenchError, match="resize rule") as e:
        generate_c_folders(src, tmp_path / "c", resize="224", progress=False)
    assert "256-crop-224" in str(e.value) and "none" in str(e.value)
    small = mini_folder(tmp_path / "small", size=(32, 32))  # 224x224 once resized
    with pytest.raises(RobenchError, match="cifar-c protocol"):
        generate_c_folders(small, tmp_path / "d", protocol="cifar-c", resize="256-crop-224",
                           progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")  # refused before writing


def test_generated_family_cache_key_holds_the_protocol(tmp_path):
    from robench.data import generated_c

    src = cifar.load(write_cifar10(tmp_path / "c10", n_test=4), name="c10")
    opts = generated_c.GeneratedCOptions(base="c10")
    dirs = {p: generated_c.output_dir(src, replace(opts, protocol=p), tmp_path)
            for p in ("auto", "cifar-c", "imagenet-c")}
    assert dirs["auto"] == dirs["cifar-c"] != dirs["imagenet-c"]
    with pytest.raises(RobenchError, match="imagenet-c"):
        generated_c.output_dir(src, replace(opts, protocol="cifar"), tmp_path)
    gen = generated_c.load(tmp_path, "g", replace(opts, stride=2),
                           LoadSettings(cache_dir=str(tmp_path / "cache"),
                                        source_of=lambda _: src))
    assert gen.info["generated"]["protocol"] == "cifar-c" and gen.info["generated"]["stride"] == 2
    assert gen.info["root"] == str(generated_c.output_dir(
        src, replace(opts, stride=2, protocol="cifar-c"), tmp_path / "cache"))
