"""A cache can only hand back what was asked for: every kind of cache entry is bound to its key
inside its seal, and a swap of two valid, sealed entries (sidecars included) is named, removed
and rebuilt -- never used. A missing seal is never a pass. (Issue 22, items 1 and 2.)

Kinds: image features, text-embedding shards, trained-head artifacts (a linear probe's head), a
fine-tuned checkpoint, and a generated -C set's corruption files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cifar_pixels, derived_state, write_cifar10
from PIL import Image

from robench.artifacts import artifact_dir, ensure, intact
from robench.data.base import ImageSource
from robench.errors import RobenchError
from robench.io import (
    SUM_SUFFIX,
    CorruptEntry,
    load_npz,
    read_json,
    verify_file,
    write_json,
    write_npz,
)


def swap(a: Path, b: Path) -> None:
    """Exchange two sealed files together with their checksum sidecars."""
    for x, y in ((a, b), (Path(str(a) + SUM_SUFFIX), Path(str(b) + SUM_SUFFIX))):
        tmp = x.with_name(x.name + ".swap")
        x.rename(tmp)
        y.rename(x)
        tmp.rename(y)


def source(name: str, seed: int, n: int = 24) -> ImageSource:
    """``n`` images of their own: the ``seed``-th block of n."""
    px, labels = cifar_pixels((seed + 1) * n, seed)
    px, labels = px[seed * n:], labels[seed * n:]
    return ImageSource(name, labels, [str(i) for i in range(10)], f"{seed:064d}",
                       lambda i: Image.fromarray(px[i]))


# -- the seal itself ---------------------------------------------------------------------------
def test_a_read_compares_the_binding_inside_the_seal(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, {"x": 1}, bound="store/a")
    write_json(b, {"x": 2}, bound="store/b")
    assert read_json(a, "store/a") == {"x": 1}
    swap(a, b)  # both intact, each in the other's place
    with pytest.raises(CorruptEntry, match="sealed as 'store/b', not 'store/a'"):
        read_json(a, "store/a")
    unbound = tmp_path / "old.json"
    write_json(unbound, {"x": 3})  # an older robench's seal names no key
    with pytest.raises(CorruptEntry, match="bound to no key"):
        verify_file(unbound, "store/old")
    Path(str(b) + SUM_SUFFIX).unlink()
    with pytest.raises(CorruptEntry, match="no checksum"):
        verify_file(b)  # a missing seal is not a pass


# -- features ----------------------------------------------------------------------------------
def test_swapped_feature_entries_are_rebuilt(tmp_path: Path, tiny_backbone, caplog) -> None:
    from robench.features import extract_features

    cache = tmp_path / "cache"
    a, b = source("a", 1), source("b", 2)
    fa = np.array(extract_features(tiny_backbone, a, cache, progress=False).features)
    fb = np.array(extract_features(tiny_backbone, b, cache, progress=False).features)
    assert not np.array_equal(fa, fb)
    files = {p.name for p in (cache / "features").iterdir()}
    ka = next(f[:-4] for f in files if f.endswith(".npy") and np.array_equal(
        np.load(cache / "features" / f), fa))
    kb = next(f[:-4] for f in files if f.endswith(".npy") and f[:-4] != ka)
    for ext in (".npy", ".json"):
        swap(cache / "features" / f"{ka}{ext}", cache / "features" / f"{kb}{ext}")
    with caplog.at_level(logging.WARNING):
        again = extract_features(tiny_backbone, b, cache, progress=False)
    assert not again.cached and np.array_equal(np.array(again.features), fb)
    assert "sealed as 'features/" in caplog.text


# -- text embeddings ---------------------------------------------------------------------------
def test_swapped_text_shards_are_encoded_again(tmp_path: Path, tiny_backbone, caplog) -> None:
    from robench.models.zeroshot import TextStore, class_embeddings

    names = ["cat", "dog", "ship"]
    wa = class_embeddings(tiny_backbone, names, ["a photo of a {}."], tmp_path, False)
    wb = class_embeddings(tiny_backbone, names, ["a drawing of a {}."], tmp_path, False)
    sa = TextStore.for_backbone(tmp_path, tiny_backbone, ["a photo of a {}."])
    sb = TextStore.for_backbone(tmp_path, tiny_backbone, ["a drawing of a {}."])
    (shard_a,), (shard_b,) = sa.shards(), sb.shards()
    assert shard_a.name == shard_b.name  # same classes: same shard name, other vectors
    swap(shard_a, shard_b)
    with caplog.at_level(logging.WARNING):
        again = class_embeddings(tiny_backbone, names, ["a drawing of a {}."], tmp_path, False)
    np.testing.assert_array_equal(again, wb)
    assert not np.array_equal(wa, wb) and "sealed as" in caplog.text
    # a store whose meta.json describes other templates is not used either
    meta_a, meta_b = sa.folder / "meta.json", sb.folder / "meta.json"
    swap(meta_a, meta_b)
    assert TextStore.for_backbone(tmp_path, tiny_backbone, ["a drawing of a {}."]).load() == {}


# -- trained heads (artifacts) -----------------------------------------------------------------
def probe(cache: Path, c: float) -> Path:
    """A probe-like artifact: a head fitted with strength ``c``, built through ensure()."""
    folder = artifact_dir(cache, "linear-probe", {"C": c})

    def build() -> None:
        write_npz(folder / "head.npz", weight=np.full((4, 3), c, np.float32))
        write_json(folder / "summary.json", {"C": c})

    ensure(folder, build, f"probe C={c}")
    return folder


def test_swapped_probe_heads_and_artifacts_are_rebuilt(tmp_path: Path) -> None:
    a, b = probe(tmp_path, 0.1), probe(tmp_path, 10.0)
    assert intact(a) and intact(b)
    swap(a / "head.npz", b / "head.npz")  # one file of each, sealed, in the other's place
    assert not intact(a, repair=True) and not (a / "head.npz").exists()
    assert probe(tmp_path, 0.1) == a
    assert load_npz(a / "head.npz")["weight"][0, 0] == np.float32(0.1)
    # a whole artifact copied over another, sidecars and manifest included
    for f in b.iterdir():
        if f.is_file():
            shutil.copy2(f, a / f.name)
    assert not intact(a)  # its manifest is bound to the other key
    assert load_npz(probe(tmp_path, 0.1) / "head.npz")["weight"][0, 0] == np.float32(0.1)
    # a missing seal is not a pass: the file is unverified, so the artifact is rebuilt
    Path(str(a / "head.npz") + SUM_SUFFIX).unlink()
    assert not intact(a)
    probe(tmp_path, 0.1)
    assert intact(a)


# -- fine-tuned checkpoints --------------------------------------------------------------------
def test_swapped_fine_tuned_checkpoints_are_trained_again(tmp_path: Path, tiny_backbone) -> None:
    from robench.data import cifar
    from robench.methods.finetune import FineTuneOptions
    from robench.models import finetune as FT

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=4), name="c",
                     options=cifar.CifarOptions(train=True))

    def run(lr: float) -> tuple[Path, str]:
        opts = FineTuneOptions(train_on="c", epochs=1, lr=lr, batch_size=16, warmup=1,
                               workers=0)
        out = artifact_dir(tmp_path / "cache", "finetune", {"lr": lr})
        fresh = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=5)
        return out, FT.finetune(fresh, src, ["a photo of a {}."], opts, out, tmp_path / "cache",
                                progress=False)

    (out_a, ref_a), (out_b, _) = run(1e-3), run(1e-2)
    want = derived_state(ref_a)
    for f in ("open_clip_model.safetensors", FT.HEAD_FILE):
        swap(out_a / "model" / f, out_b / "model" / f)
    assert not intact(out_a / "model") and not intact(out_b / "model")
    _, again = run(1e-3)  # trained again, to the same weights, not the other run's
    got = derived_state(again)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    weights = out_a / "model" / "open_clip_model.safetensors"
    Path(str(weights) + SUM_SUFFIX).unlink()  # no seal: the checkpoint is unverified
    assert not intact(out_a / "model")


# -- generated -C sets -------------------------------------------------------------------------
def test_swapped_corruption_files_are_regenerated(tmp_path: Path) -> None:
    from robench.data import cifar_c
    from robench.data.corrupt_set import generate_c_set

    base = source("base", 3, n=6)
    out = tmp_path / "set"
    generate_c_set(base, out, corruptions=["fog", "snow"], workers=1, progress=False)
    fog, snow = np.load(out / "fog.npy"), np.load(out / "snow.npy")
    swap(out / "fog.npy", out / "snow.npy")
    with pytest.raises(RobenchError, match=r"snow.npy is sealed as '-C set \w+/fog.npy', not"):
        cifar_c.load(out, name="mine")  # read as data: refused by name
    generate_c_set(base, out, corruptions=["fog", "snow"], workers=1, progress=False)
    np.testing.assert_array_equal(np.load(out / "fog.npy"), fog)
    np.testing.assert_array_equal(np.load(out / "snow.npy"), snow)
    assert len(cifar_c.load(out, name="mine").groups) == 10
