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
result, cifar = {}, {}
for n in reversed(CORRUPTIONS):
    for s in reversed(SEVERITIES):
        out = corrupt(image, n, s, image_seed(0, "synthetic32", 0, n, s))
        result[f"{n}/{s}"] = hashlib.sha256(out.tobytes() + str(out.shape).encode()).hexdigest()
        out = corrupt(image, n, s, image_seed(0, "synthetic32", 0, n, s), "cifar-c")
        cifar[f"{n}/{s}"] = hashlib.sha256(out.tobytes() + str(out.shape).encode()).hexdigest()
print(json.dumps({
    "digests": result, "cifar_digests": cifar,
    "seeds": [image_seed(1234, "imagenet/val", 999, "frost", 5)],
    "pkg_resources_left": "pkg_resources" in sys.modules,
    "numpy_float_alias_added": hasattr(np, "float_"),
    "skimage_random_noise_patched": skimage.util.random_noise is not original_random_noise,
}))
"""


def test_bit_identical_in_a_fresh_process(tmp_path, img32, grid32, grid32_cifar):
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
    assert child["cifar_digests"] == {f"{n}/{s}": digest(out)
                                      for (n, s), out in grid32_cifar.items()}
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


# --------------------------------------------------------------------------------------------
# The cifar-c protocol: make_cifar_c.py's constants
# --------------------------------------------------------------------------------------------

# The per-severity constants of hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py
# (commit ca360085d57889288c4143fddd8a707bbcae01bd), the script that made CIFAR-10-C (Hendrycks &
# Dietterich, ICLR 2019), written out here as literals, in the script's notation.
MAKE_CIFAR_C_PY = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "speckle_noise": [.06, .1, .12, .16, .2],
    "gaussian_blur": [.4, .6, 0.7, .8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    "contrast": [.75, .5, .4, .3, 0.15],
    "brightness": [.05, .1, .15, .2, .3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "elastic_transform": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                          (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                          (32 * 0.1, 32 * 0.03, 32 * 0.03)],
}
# imagecorruptions 1.1.2 (= make_imagenet_c.py) for the same corruptions, for the contrasts below
IMAGENET_C_GAUSSIAN = [.08, .12, 0.18, 0.26, 0.38]
IMAGENET_C_BRIGHTNESS = [.1, .2, .3, .4, .5]


def grey(value: int = 128) -> np.ndarray:
    return np.full((32, 32, 3), value, np.uint8)


@pytest.fixture(scope="module")
def grid32_cifar(img32):
    return {(n, s): corrupt(img32, n, s, image_seed(0, "synthetic32", 0, n, s), "cifar-c")
            for n in CORRUPTIONS for s in SEVERITIES}


def test_cifar_c_table_is_make_cifar_c_py():
    from robench.data.cifar_corruptions import CIFAR_C, IMSIZE, constants

    assert set(CIFAR_C) == set(CORRUPTIONS) == set(MAKE_CIFAR_C_PY) and IMSIZE == 32
    for name, want in MAKE_CIFAR_C_PY.items():
        got = CIFAR_C[name]
        assert len(got) == 5, name
        for s, (g, w) in enumerate(zip(got, want, strict=True), start=1):
            assert constants(name, s) == g
            if name == "zoom_blur":  # the table holds np.arange's (stop, step)
                np.testing.assert_array_equal(np.arange(1, *g), w)
            elif name == "elastic_transform":  # ... fractions of IMSIZE
                assert tuple(IMSIZE * f for f in g) == w, (name, s)
            else:
                assert g == w, (name, s)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_std_is_the_protocols_sigma(severity):
    # additive N(0, c^2) on [0, 1] pixels: on flat grey (no clipping) the std is c * 255
    sigma = {p: corrupt(grey(), "gaussian_noise", severity, 100 + severity, p).std() / 255
             for p in ("cifar-c", "imagenet-c")}
    assert sigma["cifar-c"] == pytest.approx(MAKE_CIFAR_C_PY["gaussian_noise"][severity - 1],
                                             rel=0.05)
    if severity <= 2:  # beyond, imagenet-c's sigma clips at 0 and 255
        assert sigma["imagenet-c"] == pytest.approx(IMAGENET_C_GAUSSIAN[severity - 1], rel=0.05)
    assert sigma["imagenet-c"] > 1.5 * sigma["cifar-c"]  # the review's finding, at 32 px


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_speckle_and_impulse_noise_follow_their_constants(severity):
    p = 128 / 255
    shot = corrupt(grey(), "shot_noise", severity, 7, "cifar-c").std() / 255
    c = MAKE_CIFAR_C_PY["shot_noise"][severity - 1]
    assert shot == pytest.approx(np.sqrt(p / c), rel=0.06)  # Poisson(c p) / c
    speckle = corrupt(grey(), "speckle_noise", severity, 7, "cifar-c").std() / 255
    assert speckle == pytest.approx(p * MAKE_CIFAR_C_PY["speckle_noise"][severity - 1], rel=0.06)
    changed = np.mean([(corrupt(grey(), "impulse_noise", severity, seed, "cifar-c") != 128).mean()
                       for seed in range(8)])
    assert changed == pytest.approx(MAKE_CIFAR_C_PY["impulse_noise"][severity - 1], rel=0.15)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_and_saturate_closed_forms_on_grey(severity):
    # grey has S = 0 and V = v/255: brightness gives min(V + c, 1) on every channel, exactly
    levels = np.arange(0, 256, 8, dtype=np.uint8)
    img = np.repeat(np.resize(levels, (32, 32))[..., None], 3, axis=2)
    for protocol, table in (("cifar-c", MAKE_CIFAR_C_PY["brightness"]),
                            ("imagenet-c", IMAGENET_C_BRIGHTNESS)):
        c = table[severity - 1]
        want = np.uint8(np.clip(img / 255.0 + c, 0, 1) * 255)
        np.testing.assert_array_equal(corrupt(img, "brightness", severity, 0, protocol), want)
    # saturate: S -> S * a + b = b; hue 0 (red): R = V, G = B = V (1 - b)
    a, b = MAKE_CIFAR_C_PY["saturate"][severity - 1]
    out = corrupt(img, "saturate", severity, 0, "cifar-c").astype(int)
    v = img[..., 0].astype(float)
    np.testing.assert_allclose(out[..., 0], v, atol=1)
    np.testing.assert_allclose(out[..., 1], v * (1 - b), atol=1)
    np.testing.assert_allclose(out[..., 2], v * (1 - b), atol=1)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_jpeg_and_pixelate_closed_forms(img32, severity):
    x = img32 / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    c = MAKE_CIFAR_C_PY["contrast"][severity - 1]
    want = np.uint8(np.clip((x - means) * c + means, 0, 1) * 255)
    np.testing.assert_array_equal(corrupt(img32, "contrast", severity, 0, "cifar-c"), want)

    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img32).save(buf, "JPEG", quality=MAKE_CIFAR_C_PY["jpeg_compression"][
        severity - 1])
    np.testing.assert_array_equal(corrupt(img32, "jpeg_compression", severity, 0, "cifar-c"),
                                  np.asarray(Image.open(buf).convert("RGB")))
    # pixelate: box filter to int(32 c) and back up with a box filter (not nearest neighbour)
    side = int(32 * MAKE_CIFAR_C_PY["pixelate"][severity - 1])
    box = Image.Resampling.BOX
    want = np.asarray(Image.fromarray(img32).resize((side, side), box).resize((32, 32), box))
    np.testing.assert_array_equal(corrupt(img32, "pixelate", severity, 0, "cifar-c"), want)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_cifar_glass_blur_equals_the_per_pixel_reference(img32, severity):
    """The shared fast glass blur at make_cifar_c.py's constants equals a plain per-pixel loop:
    blur, for each pixel from the far edge down move a random neighbour's value into it (the
    reference's tuple 'swap' on views is a copy), blur again."""
    from robench.data.corruptions import load_module

    ic = load_module()
    sigma, delta, iterations = MAKE_CIFAR_C_PY["glass_blur"][severity - 1]
    seed = image_seed(3, "glass", 0, "glass_blur", severity)
    state = np.random.RandomState(seed)
    x = np.uint8(ic.gaussian(img32 / 255.0, sigma=sigma, channel_axis=-1) * 255)
    for _ in range(iterations):
        for h in range(32 - delta, delta, -1):
            for w in range(32 - delta, delta, -1):
                dx, dy = state.randint(-delta, delta, size=(2,))
                x[h, w] = x[h + dy, w + dx].copy()
    want = np.uint8(np.clip(ic.gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)
    np.testing.assert_array_equal(corrupt(img32, "glass_blur", severity, seed, "cifar-c"), want)


def test_cifar_c_grid_runs_is_deterministic_and_weaker_noise(img32, grid32, grid32_cifar):
    check_grid(img32, grid32_cifar)
    for (n, s), out in grid32_cifar.items():
        again = corrupt(img32, n, s, image_seed(0, "synthetic32", 0, n, s), "cifar-c")
        assert np.array_equal(out, again), (n, s)
    # the corruptions the two protocols share an implementation for differ by their constants
    for n in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "contrast",
              "brightness", "jpeg_compression", "gaussian_blur", "defocus_blur"):
        for s in SEVERITIES:
            assert not np.array_equal(grid32_cifar[(n, s)], grid32[(n, s)]), (n, s)
    for n in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"):
        dist = {g: np.abs(grid[(n, 1)].astype(int) - img32).mean()
                for g, grid in (("cifar", grid32_cifar), ("imagenet", grid32))}
        assert dist["cifar"] < dist["imagenet"], n


def test_cifar_c_order_independent_and_seeded(img32, grid32_cifar):
    keys = list(grid32_cifar)
    random.Random(5).shuffle(keys)
    for n, s in keys[:40]:
        corrupt(synthetic_image(32, 32, seed=9), n, s, 77, "cifar-c")  # advance the RNGs
        out = corrupt(img32, n, s, image_seed(0, "synthetic32", 0, n, s), "cifar-c")
        assert np.array_equal(out, grid32_cifar[(n, s)]), (n, s)
    for n in RANDOM:
        outs = [corrupt(img32, n, 5, seed, "cifar-c") for seed in (1, 2, 3, 4)]
        assert any(not np.array_equal(outs[0], o) for o in outs[1:]), n
    for n in SEED_FREE:
        assert np.array_equal(corrupt(img32, n, 4, 1, "cifar-c"),
                              corrupt(img32, n, 4, 2**32 - 1, "cifar-c")), n


def test_cifar_c_same_pixels_in_spawned_workers(img32, grid32_cifar):
    keys = list(grid32_cifar)[::3]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        outs = list(pool.map(corrupt, [img32] * len(keys), [n for n, _ in keys],
                             [s for _, s in keys],
                             [image_seed(0, "synthetic32", 0, n, s) for n, s in keys],
                             ["cifar-c"] * len(keys), chunksize=5))
    for key, out in zip(keys, outs, strict=True):
        assert np.array_equal(out, grid32_cifar[key]), key


def test_protocol_errors_name_the_valid_values(img32):
    from robench.errors import RobenchError

    with pytest.raises(RobenchError, match="imagenet-c") as e:
        corrupt(img32, "fog", 1, 0, "cifar10-c")
    assert "cifar-c" in str(e.value) and e.value.fix
    with pytest.raises(RobenchError, match="32x32 images only") as e:
        corrupt(synthetic_image(64, 48), "fog", 1, 0, "cifar-c")
    assert "64x48" in e.value.problem and "imagenet-c" in e.value.fix
