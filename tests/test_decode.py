"""Images that cannot be decoded safely are skipped, not fatal; every mode becomes the right
8-bit RGB image; pixel arrays of another dtype are refused, never cast.

Each bad input is built here: decompression bombs are tiny files whose header claims huge
dimensions (a 1x1 PNG with its IHDR patched and its CRC recomputed; an 8x8 JPEG with its SOF0
patched), so they cost nothing to make and would cost gigabytes to decode."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cifar10
from PIL import Image

from robench.data import cifar, cifar_c, folder
from robench.data.base import open_rgb
from robench.errors import RobenchError

# PIL warns about images between its limit and twice it; robench refuses them (named)
quiet_bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
GREY16 = [0, 128, 129, 257, 32896, 65535]  # 16-bit samples
GREY8 = [0, 0, 1, 1, 128, 255]  # round(v / 257)


# -- fixtures: the bad inputs ---------------------------------------------------------------------
def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC recomputed)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"  # signature (8), length (4), type (4), then width, height
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def jpeg_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 8x8 JPEG whose SOF0 frame header claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker (2), length (2), precision (1), height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def grey16(path: Path, values: list[int] | np.ndarray = GREY16, dtype: str = "<u2") -> Path:
    """A 16-bit greyscale image (one row of ``values``, or the 2-D array given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(values if np.ndim(values) == 2 else [values], dtype=dtype)
                    ).save(path)
    return path


def undecodable(path: Path) -> str:
    """Why ``open_rgb`` refuses ``path`` (the test fails if it decodes it or raises otherwise)."""
    from robench.data.base import UndecodableImage

    with pytest.raises(UndecodableImage) as e:
        open_rgb(path)
    return str(e.value)


# -- decompression bombs --------------------------------------------------------------------------
@quiet_bomb_warning
@pytest.mark.parametrize(("make", "size", "why"), [
    (png_bomb, (30000, 30000), "exceeds limit"),  # PIL's DecompressionBombError
    (jpeg_bomb, (60000, 60000), "exceeds limit"),
    (png_bomb, (10000, 10000), "10000x10000 = 100000000 pixels, over the limit"),  # PIL warns
    (jpeg_bomb, (10000, 10000), "over the limit of 89478485"),
])
def test_a_decompression_bomb_is_undecodable_not_raised(tmp_path, make, size, why):
    path = make(tmp_path / f"bomb{make.__name__[:3]}", *size)
    message = undecodable(path)
    assert "decompression bomb" in message and why in message


@quiet_bomb_warning
def test_the_pixel_limit_is_pils(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (64, 64)).save(path)
    assert open_rgb(path).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    assert "64x64 = 4096 pixels, over the limit of 4095" in undecodable(path)


# -- modes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "dtype"), [("g.png", "<u2"), ("g.tif", ">u2"),
                                             ("g32.tif", "int32")])
def test_16bit_grey_is_scaled_by_1_over_257(tmp_path, name, dtype):
    path = grey16(tmp_path / name, dtype=dtype)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I")
    px = np.asarray(open_rgb(path))
    assert px.dtype == np.uint8 and px.shape == (1, len(GREY16), 3)
    np.testing.assert_array_equal(px[0], np.repeat(np.array(GREY8)[:, None], 3, axis=1))


def test_a_16bit_mid_grey_png_is_mid_grey_not_white(tmp_path):
    path = grey16(tmp_path / "mid.png", [128 * 257] * 16)
    with Image.open(path) as im:
        assert im.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL alone clips
    assert set(np.asarray(open_rgb(path)).ravel().tolist()) == {128}


@pytest.mark.parametrize(("array", "message"), [
    (np.array([[0.25, 1.0]], np.float32), "mode F image: floating-point samples"),
    (np.array([[-5, 70000]], np.int32), "mode I image with values -5..70000"),
])
def test_modes_without_an_8bit_scale_are_refused_by_name(tmp_path, array, message):
    Image.fromarray(array).save(tmp_path / "x.tif")
    assert message in undecodable(tmp_path / "x.tif")


def test_cmyk_converts_through_pil(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
        np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "c.jpg")),
                                      np.asarray(im.convert("RGB")))
    assert np.asarray(open_rgb(tmp_path / "c.jpg"))[0, 0].tolist() == [255, 0, 0]


def _palette(path: Path, fmt: str) -> Path:
    p = Image.new("P", (2, 2), 0)  # index 0: black, transparent; index 1: a colour
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(path, format=fmt, transparency=0)
    return path


def _rgb_key(path: Path) -> Path:
    im = Image.new("RGB", (2, 2), (0, 0, 0))
    im.putpixel((1, 1), (10, 20, 30))
    im.save(path, transparency=(0, 0, 0))  # a tRNS colour key
    return path


def _la(path: Path, size: int = 2) -> Path:
    """Grey + alpha: transparent black, except an opaque grey-20 bottom-right pixel."""
    px = np.zeros((size, size, 2), np.uint8)
    px[-1, -1] = (20, 255)
    Image.fromarray(px, "LA").save(path)
    return path


@pytest.mark.parametrize(("make", "opaque"), [
    (lambda p: _palette(p / "p.png", "PNG"), [10, 20, 30]),
    (lambda p: _palette(p / "p.gif", "GIF"), [10, 20, 30]),
    (lambda p: _rgb_key(p / "key.png"), [10, 20, 30]),
    (lambda p: _la(p / "la.png"), [20, 20, 20]),
])
def test_transparent_pixels_are_composited_over_white(tmp_path, make, opaque):
    px = np.asarray(open_rgb(make(tmp_path))).reshape(-1, 3)
    assert px[:3].tolist() == [[255, 255, 255]] * 3  # transparent: white, not the stored black
    assert px[3].tolist() == opaque  # opaque: unchanged


def test_rgba_line_art_stays_visible_and_partial_alpha_blends(tmp_path):
    """A black drawing on transparent black: dropping the alpha gives an all-black image."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[1:3, 1:3] = (0, 0, 0, 255)
    rgba[0, 3] = (255, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "art.png")
    px = np.asarray(open_rgb(tmp_path / "art.png"))
    assert px[0, 0].tolist() == [255, 255, 255] and px[1, 1].tolist() == [0, 0, 0]
    assert px[0, 3].tolist() == [255, 127, 127]  # red at alpha 128/255 over white
    from robench.data.base import to_rgb

    pa = Image.new("PA", (1, 1), (0, 0))  # PA exists only in memory: the same rule
    assert to_rgb(pa).getpixel((0, 0)) == (255, 255, 255)


def test_opaque_images_decode_as_before(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)]), "RGBA").save(
        tmp_path / "b.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "a.png")), rgb)
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "b.png")), rgb)
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "l.png")),
                                  np.repeat(rgb[..., :1], 3, axis=2))


# -- pixel arrays: uint8 or a named error ---------------------------------------------------------
def _cifar_with(root: Path, data: np.ndarray) -> Path:
    write_cifar10(root, n_test=4, n_train=2)
    batch = root / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as f:
        pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    return root


@pytest.mark.parametrize(("dtype", "scale"), [(np.float64, 255.0), (np.float32, 1.0),
                                              (np.int64, 255)])
def test_a_cifar_batch_of_another_dtype_is_refused_not_cast(tmp_path, dtype, scale):
    data = (np.linspace(0, 1, 4 * 3072).reshape(4, 3072) * scale).astype(dtype)
    root = _cifar_with(tmp_path, data)
    with pytest.raises(RobenchError, match=f"holds {np.dtype(dtype).name} pixels"):
        cifar.load(root, name="cifar10")


def test_a_cifar_batch_of_the_wrong_shape_is_refused(tmp_path):
    root = _cifar_with(tmp_path, np.zeros((4, 1024), np.uint8))
    with pytest.raises(RobenchError, match=r"uint8\(4, 1024\), expected uint8 \(N, 3072\)"):
        cifar.load(root, name="cifar10")


def _c_with(root: Path, fog: np.ndarray) -> Path:
    root.mkdir(parents=True)
    np.save(root / "labels.npy", np.arange(10) % 10)
    np.save(root / "fog.npy", fog)
    (root / "robench_c.json").write_text(json.dumps({"corruptions": ["fog"]}))
    return root


@pytest.mark.parametrize(("fog", "message"), [
    (np.full((10, 32, 32, 3), 0.5, np.float32), "holds float32 pixels"),
    (np.full((10, 32, 32, 3), 300, np.uint16), "holds uint16 pixels"),
    (np.zeros((10, 3, 32, 32), np.uint8), r"is uint8\(10, 3, 32, 32\), expected uint8 "
                                          r"\(10, 32, 32, 3\)"),
])
def test_a_c_file_of_another_dtype_or_shape_is_refused(tmp_path, fog, message):
    with pytest.raises(RobenchError, match=message):
        cifar_c.load(_c_with(tmp_path / "c", fog), name="c")


# -- the run: skipped and named (strict=false), a named error (strict=true) -----------------------
def bad_folder(root: Path) -> Path:
    """Two classes of 32x32 images, with a PNG bomb, a JPEG bomb, a 16-bit PNG and a
    transparent PNG among them."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / cls / f"{i}.png")
    png_bomb(root / "cat" / "bomb.png", 30000, 30000)
    jpeg_bomb(root / "dog" / "bomb.jpg", 60000, 60000)
    grey16(root / "dog" / "grey16.png", np.full((32, 32), 128 * 257))
    _la(root / "cat" / "clear.png", size=32)
    return root


BOMBS = ["cat/bomb.png", "dog/bomb.jpg"]


def _suite(tmp_path: Path, workers: int) -> Path:
    suite = tmp_path / "bombs.yaml"
    suite.write_text(f"""
models: [tiny-random]
datasets: [{{name: mine, family: folder, root: {bad_folder(tmp_path / 'mine')}}}]
id_dataset: null
model: {{batch_size: 4, num_workers: {workers}}}
metrics: {{bootstrap: 0}}
""")
    return suite


def _run(tmp_path: Path, suite: Path, capsys, *extra: str) -> tuple[int, str]:
    from robench.cli import main

    code = main(["run", f"suite={suite}", "device=cpu", "progress=false",
                 f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}", *extra])
    return code, capsys.readouterr().err


def test_a_run_skips_and_names_bombs_and_strict_fails_naming_them(tmp_path, capsys):
    suite = _suite(tmp_path, workers=0)
    code, err = _run(tmp_path, suite, capsys, "strict=true")
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert "mine: cannot decode image(s) cat/bomb.png" in err and "fix:" in err
    assert not (tmp_path / "r" / "bombs" / "tiny-random" / "mine.json").exists()

    code, err = _run(tmp_path, suite, capsys)
    assert code == 0, err[-3000:]
    rec = json.loads((tmp_path / "r" / "bombs" / "tiny-random" / "mine.json").read_text())
    assert rec["data"]["n"] == 12 and rec["data"]["n_bad"] == 2
    assert rec["data"]["bad_samples"] == BOMBS
    assert rec["metrics"]["n"] == 10  # scored over the images that decode


def test_dataloader_workers_skip_bombs_too(tmp_path, capsys):
    code, err = _run(tmp_path, _suite(tmp_path, workers=2), capsys)
    assert code == 0, err[-3000:]
    rec = json.loads((tmp_path / "r" / "bombs" / "tiny-random" / "mine.json").read_text())
    assert rec["data"]["bad_samples"] == BOMBS


def test_verify_and_a_run_skip_the_same_images(tmp_path, capsys, tiny_backbone):
    from robench.cli import main
    from robench.data.verify import decode_all
    from robench.features import extract_features

    suite = _suite(tmp_path, workers=0)
    src = folder.load(tmp_path / "mine", name="mine")
    feats = extract_features(tiny_backbone, src, tmp_path / "c", batch_size=4, num_workers=0,
                             progress=False)
    bad = decode_all(src, np.arange(len(src)), workers=2, progress=False)
    assert [i for i, _ in bad] == feats.bad == [src.info["paths"].index(p) for p in BOMBS]
    assert all("decompression bomb" in why for _, why in bad)
    grey = src.load_image(src.info["paths"].index("dog/grey16.png"))
    assert set(np.asarray(grey).ravel().tolist()) == {128}

    code = main(["data", "verify", "--suite", str(suite), "--no-progress",
                 "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 1 and "2 of 12 images could not be decoded" in out
    assert "cat/bomb.png (decompression bomb" in out and "dog/bomb.jpg (decompression bomb" in out


def test_a_bomb_in_the_base_of_a_generated_set_is_a_named_error(tmp_path):
    from robench.data.corrupt_set import generate_c_set

    src = folder.load(bad_folder(tmp_path / "mine"), name="mine")
    with pytest.raises(RobenchError, match="mine: image cat/bomb.png cannot be decoded "
                                           r"\(decompression bomb"):
        generate_c_set(src, tmp_path / "out", corruptions=("fog",), severities=(1,), workers=1,
                       progress=False)


def test_a_training_image_that_cannot_be_decoded_is_a_named_error() -> None:
    """Fine-tuning reads its split through the same guarded path; a training batch cannot
    skip a row, so an undecodable image is a named error, never a traceback."""
    import numpy as np
    from PIL import Image

    from robench.data.base import ImageSource
    from robench.errors import RobenchError
    from robench.models.finetune import _Labelled

    def loader(i: int) -> Image.Image:
        if i == 1:
            raise Image.DecompressionBombError("Image size (3600000000 pixels) exceeds limit")
        return Image.new("RGB", (8, 8))

    src = ImageSource("train", np.array([0, 1]), ["a", "b"], "0" * 64, loader,
                      info={"paths": ["a/x.png", "b/bomb.png"]})
    data = _Labelled(src, lambda im: np.asarray(im), seed=0, epoch=0)
    assert data[0][1] == 0
    with pytest.raises(RobenchError, match="training image b/bomb.png cannot be decoded"):
        data[1]
