"""Tests for robench.data.corruptions (deterministic imagecorruptions wrapper)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robench.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    corrupt,
    image_seed,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = Path("/work/shared/realdata")
CIFAR_NPZ = REALDATA / "cifar10" / "cifar10_test_first932_exact.npz"
IMAGENET_DIR = REALDATA / "imagenet" / "sample_1k"

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
# Corruptions that draw random numbers at all; the others must not depend on the seed.
RANDOM = NOISE + (
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "spatter",
)
SEED_FREE = tuple(n for n in CORRUPTIONS if n not in RANDOM)


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A natural-ish RGB image: smooth gradients, an edge, stripes and mild noise in [20, 235]."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 80 * np.sin(xx / max(width, 1) * 3.0 + 0.5) * np.cos(yy / max(height, 1) * 2.0)
    g = 60 + 140 * yy / max(height - 1, 1)
    b = np.where(xx + 0.5 * yy > 0.6 * width, 190.0, 70.0) + 30 * np.sin(xx / 2.0)
    img = np.stack([r, g, b], axis=-1) + rs.normal(0, 6, size=(height, width, 3))
    return np.clip(img, 20, 235).astype(np.uint8)


def digest(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()


def run_grid(
    image: np.ndarray, key: str, severities=SEVERITIES
) -> dict[tuple[str, int], np.ndarray]:
    return {
        (n, s): corrupt(image, n, s, image_seed(0, key, 0, n, s))
        for n in CORRUPTIONS
        for s in severities
    }


def check_grid(image: np.ndarray, outputs: dict[tuple[str, int], np.ndarray]) -> None:
    for (n, s), out in outputs.items():
        assert out.dtype == np.uint8, (n, s)
        assert out.shape == image.shape, (n, s, out.shape)
        if s == 5:
            assert not np.array_equal(out, image), f"{n} at severity 5 left the image unchanged"


@pytest.fixture(scope="module")
def img32() -> np.ndarray:
    return synthetic_image(32, 32, seed=1)


@pytest.fixture(scope="module")
def grid32(img32):
    before = img32.copy()
    out = run_grid(img32, "synthetic32")
    assert np.array_equal(img32, before), "corrupt() modified its input"
    return out


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------


def test_constants():
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    assert CORRUPTIONS[:4] == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur")
    assert CORRUPTIONS[15:] == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert len(STANDARD_CORRUPTIONS) == 15
    assert set(CORRUPTIONS) - set(STANDARD_CORRUPTIONS) == {
        "gaussian_blur",
        "saturate",
        "spatter",
        "speckle_noise",
    }
    assert SEVERITIES == (1, 2, 3, 4, 5)
    corrupt(synthetic_image(32, 32), "contrast", 1, 0)  # runs the shim; then upstream imports
    import imagecorruptions

    assert tuple(imagecorruptions.get_corruption_names("all")) == CORRUPTIONS


# --------------------------------------------------------------------------------------------
# All 19 x 5 on several sizes
# --------------------------------------------------------------------------------------------


def test_all_corruptions_32x32(img32, grid32):
    assert len(grid32) == 19 * 5
    check_grid(img32, grid32)


@pytest.mark.parametrize("shape", [(100, 120), (47, 33)])
def test_all_corruptions_non_square(shape):
    image = synthetic_image(*shape, seed=2)
    check_grid(image, run_grid(image, f"synthetic{shape}"))


def test_all_corruptions_224_real_or_synthetic():
    files = sorted(IMAGENET_DIR.glob("*.JPEG")) if IMAGENET_DIR.is_dir() else []
    if files:
        from PIL import Image

        with Image.open(files[0]) as im:
            image = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))
    else:
        image = synthetic_image(224, 224, seed=3)
    check_grid(image, run_grid(image, "size224"))


def test_real_cifar10_images():
    if not CIFAR_NPZ.is_file():
        pytest.skip(f"{CIFAR_NPZ} not available")
    images = np.load(CIFAR_NPZ)["images"]
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    for idx in (0, 1, 7):
        image = images[idx]
        outputs = {
            (n, s): corrupt(image, n, s, image_seed(0, "cifar10/test", idx, n, s))
            for n in CORRUPTIONS
            for s in SEVERITIES
        }
        check_grid(image, outputs)


def test_real_imagenet_non_square_and_grayscale():
    if not IMAGENET_DIR.is_dir():
        pytest.skip(f"{IMAGENET_DIR} not available")
    from PIL import Image

    files = sorted(IMAGENET_DIR.glob("*.JPEG"))
    with Image.open(files[1]) as im:
        rgb = np.asarray(im.convert("RGB").resize((120, 90), Image.BILINEAR))
    check_grid(rgb, run_grid(rgb, "imagenet-nonsquare", severities=(1, 5)))

    gray = None
    for f in files:
        with Image.open(f) as im:
            if im.mode == "L":
                gray = np.asarray(im.resize((64, 48), Image.BILINEAR))
                break
    if gray is None:
        pytest.skip("no grayscale ImageNet sample")
    stacked = np.stack([gray] * 3, axis=-1)
    for n in CORRUPTIONS:
        out = corrupt(gray, n, 5, 11)
        assert out.shape == (48, 64, 3) and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(stacked, n, 5, 11)), n


def test_grayscale_and_single_channel_inputs(img32):
    gray = img32[:, :, 1].copy()
    stacked = np.stack([gray] * 3, axis=-1)
    for n in CORRUPTIONS:
        ref = corrupt(stacked, n, 3, 5)
        assert np.array_equal(corrupt(gray, n, 3, 5), ref), n
        assert np.array_equal(corrupt(gray[:, :, None], n, 3, 5), ref), n


def test_non_contiguous_input(img32):
    big = synthetic_image(64, 80, seed=4)
    view = big[::2, 8:72:2]  # 32x32, non-contiguous
    assert not view.flags["C_CONTIGUOUS"]
    for n in ("glass_blur", "elastic_transform", "jpeg_compression", "fog"):
        assert np.array_equal(corrupt(view, n, 4, 9), corrupt(view.copy(), n, 4, 9)), n


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_same_call_twice_is_bit_identical(img32, grid32):
    for (n, s), out in grid32.items():
        again = corrupt(img32, n, s, image_seed(0, "synthetic32", 0, n, s))
        assert np.array_equal(out, again), (n, s)


def test_order_independent(img32, grid32):
    keys = list(grid32)
    random.Random(3).shuffle(keys)
    other = synthetic_image(32, 32, seed=9)
    for n, s in keys:
        corrupt(other, n, s, 77)  # interleave unrelated work that advances the RNGs
        out = corrupt(img32, n, s, image_seed(0, "synthetic32", 0, n, s))
        assert np.array_equal(out, grid32[(n, s)]), (n, s)


def test_impulse_noise_respects_seed(img32):
    # impulse_noise is the one imagecorruptions corruption that ignored np.random.seed
    # (skimage.util.random_noise draws from an unseeded default_rng); it must be fixed.
    outs = [corrupt(img32, "impulse_noise", s, 42) for s in SEVERITIES for _ in range(2)]
    for a, b in zip(outs[::2], outs[1::2], strict=True):
        assert np.array_equal(a, b)


_CHILD_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
np.random.seed(12345); np.random.random(17)  # a different global state than the parent
import skimage.util
original_random_noise = skimage.util.random_noise
from robench.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, image_seed
image = np.load(sys.argv[1])
result = {}
for n in reversed(CORRUPTIONS):
    for s in reversed(SEVERITIES):
        out = corrupt(image, n, s, image_seed(0, "synthetic32", 0, n, s))
        result[f"{n}/{s}"] = hashlib.sha256(out.tobytes() + str(out.shape).encode()).hexdigest()
print(json.dumps({
    "digests": result,
    "seeds": [image_seed(1234, "imagenet/val", 999, "frost", 5)],
    "pkg_resources_left": "pkg_resources" in sys.modules,
    "numpy_float_alias_added": hasattr(np, "float_"),
    "skimage_random_noise_patched": skimage.util.random_noise is not original_random_noise,
}))
"""


def test_bit_identical_in_a_fresh_process(tmp_path, img32, grid32):
    path = tmp_path / "img.npy"
    np.save(path, img32)
    env = dict(os.environ, PYTHONHASHSEED="987", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {f"{n}/{s}": digest(out) for (n, s), out in grid32.items()}
    assert child["digests"] == expected
    assert child["seeds"] == [image_seed(1234, "imagenet/val", 999, "frost", 5)]
    # The shim patches only imagecorruptions' own namespace and leaves no stand-ins behind.
    assert child["pkg_resources_left"] is False
    assert child["numpy_float_alias_added"] is False
    assert child["skimage_random_noise_patched"] is False


def test_bit_identical_with_spawned_worker_pool(img32, grid32):
    keys = list(grid32)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        outs = list(
            pool.map(
                corrupt,
                [img32] * len(keys),
                [n for n, _ in keys],
                [s for _, s in keys],
                [image_seed(0, "synthetic32", 0, n, s) for n, s in keys],
                chunksize=7,
            )
        )
    for key, out in zip(keys, outs, strict=True):
        assert np.array_equal(out, grid32[key]), key


def test_seed_changes_noise_and_only_random_corruptions(img32):
    for n in NOISE:
        for s in SEVERITIES:
            assert not np.array_equal(corrupt(img32, n, s, 1), corrupt(img32, n, s, 2)), (n, s)
    for n in RANDOM:
        outs = [corrupt(img32, n, 5, seed) for seed in (1, 2, 3, 4)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:]), n
    for n in SEED_FREE:
        assert np.array_equal(corrupt(img32, n, 4, 1), corrupt(img32, n, 4, 2**32 - 1)), n


def test_global_numpy_rng_state_untouched(img32):
    np.random.seed(2024)
    expected_next = np.random.RandomState(2024).random_sample(5)
    state = np.random.get_state()
    for n in CORRUPTIONS:
        corrupt(img32, n, 3, 123)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1])
    assert after[2:] == state[2:]
    assert np.array_equal(np.random.random_sample(5), expected_next)


# --------------------------------------------------------------------------------------------
# Faithfulness to imagecorruptions (incl. the two sped-up corruptions)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (41, 57)])
def test_matches_upstream_imagecorruptions(shape):
    image = synthetic_image(*shape, seed=5)
    corrupt(image, "contrast", 1, 0)  # make sure the shim has run before importing upstream
    import imagecorruptions

    for n in CORRUPTIONS:
        for s in SEVERITIES:
            seed = image_seed(7, "upstream", 0, n, s)
            np.random.seed(seed)
            ref = imagecorruptions.corrupt(image, severity=s, corruption_name=n)
            assert np.array_equal(corrupt(image, n, s, seed), ref), (n, s)


def test_frost_matches_upstream_when_image_exceeds_frost_photo():
    image = synthetic_image(340, 600, seed=6)  # taller/wider than several frost photos
    corrupt(image[:32, :32], "contrast", 1, 0)
    import imagecorruptions

    for s in (1, 5):
        for seed in (0, 1, 2, 3):
            np.random.seed(seed)
            ref = imagecorruptions.corrupt(image, severity=s, corruption_name="frost")
            assert np.array_equal(corrupt(image, "frost", s, seed), ref), (s, seed)


def test_spatter_empty_liquid_layer_is_explicit(recwarn):
    # Upstream spatter divides 0/0 when the random liquid layer is empty (seed 35 at 32x32,
    # severity 1) and returns NaN, which np.uint8() turns into an all-black image on x86.
    # robench reproduces that result explicitly, without warnings or undefined casts.
    image = synthetic_image(32, 32, seed=8)
    out = corrupt(image, "spatter", 1, 35)
    assert out.dtype == np.uint8 and not out.any()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert np.array_equal(out, corrupt(image, "spatter", 1, 35))
    assert corrupt(image, "spatter", 1, 36).any()


# --------------------------------------------------------------------------------------------
# image_seed
# --------------------------------------------------------------------------------------------


def test_image_seed_is_stable_and_32_bit():
    # Pinned: changing these changes every generated -C image.
    assert image_seed(0, "cifar10/test", 0, "gaussian_noise", 1) == 3274778770
    assert image_seed(1234, "imagenet/val", 999, "frost", 5) == 3251324788
    seeds = {
        image_seed(0, key, i, n, s)
        for key in ("a", "b")
        for i in range(20)
        for n in CORRUPTIONS
        for s in SEVERITIES
    }
    assert len(seeds) == 2 * 20 * 19 * 5  # no collisions in a small grid
    assert all(0 <= x < 2**32 for x in seeds)
    assert image_seed(0, "a", 1, "fog", 2) == image_seed(np.int64(0), "a", np.int32(1), "fog", 2)
    assert image_seed(0, "a", 1, "fog", 2) != image_seed(1, "a", 1, "fog", 2)
    # No ambiguity from concatenation.
    assert image_seed(0, "a1", 1, "fog", 2) != image_seed(0, "a", 11, "fog", 2)
    with pytest.raises(TypeError):
        image_seed(0, "a", 1.5, "fog", 2)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names(img32):
    with pytest.raises(ValueError, match="unknown corruption") as exc:
        corrupt(img32, "gaussian_nosie", 1, 0)
    for n in CORRUPTIONS:
        assert n in str(exc.value)
    with pytest.raises(ValueError):
        corrupt(img32, None, 1, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, 3.0, True, "3", None])
def test_bad_severity(img32, severity):
    with pytest.raises(ValueError, match="severity"):
        corrupt(img32, "fog", severity, 0)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, None, "7"])
def test_bad_seed(img32, seed):
    with pytest.raises(ValueError, match="seed"):
        corrupt(img32, "fog", 1, seed)


def test_bad_images(img32):
    with pytest.raises(TypeError):
        corrupt(img32.astype(np.float32), "fog", 1, 0)
    with pytest.raises(TypeError):
        corrupt(img32.tolist(), "fog", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        corrupt(np.zeros((32, 32, 4), np.uint8), "fog", 1, 0)
    with pytest.raises(ValueError):
        corrupt(np.zeros((2, 32, 32, 3), np.uint8), "fog", 1, 0)
    with pytest.raises(ValueError, match=">= 32"):
        corrupt(np.zeros((31, 64, 3), np.uint8), "fog", 1, 0)
