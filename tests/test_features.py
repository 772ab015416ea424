"""Feature cache: exact features, content addressing, no decoding on reuse, corrupt images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_cifar10
from PIL import Image

from robench.data import cifar, folder
from robench.errors import RobenchError
from robench.features import extract_features, feature_key


def test_features_match_manual_encoding_and_cache_skips_decoding(tiny_backbone, tmp_path):
    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    fs = extract_features(tiny_backbone, src, tmp_path / "cache", batch_size=16, num_workers=0,
                          progress=False)
    # an fp32 run stores float32 features: what the model computed, not a float16 rounding
    assert not fs.cached and fs.features.dtype == np.float32 and fs.bad == []
    x = torch.stack([tiny_backbone.preprocess(src.load_image(i)) for i in range(len(src))])
    ref = tiny_backbone.encode_images(x).numpy()
    np.testing.assert_allclose(fs.features, ref, rtol=0, atol=1e-6)
    half = extract_features(tiny_backbone, src, tmp_path / "cache", batch_size=16,
                            num_workers=0, progress=False, dtype="float16")
    assert half.features.dtype == np.float16 and half.key != fs.key  # its own cache entry
    np.testing.assert_allclose(np.asarray(half.features, np.float32), ref, atol=2e-3)

    def boom(i):
        raise AssertionError("an image was decoded although the features are cached")

    src.loader = boom
    again = extract_features(tiny_backbone, src, tmp_path / "cache", num_workers=0,
                             progress=False)
    assert again.cached and isinstance(again.features, np.memmap)
    np.testing.assert_array_equal(again.features, fs.features)


def test_workers_give_identical_features(tiny_backbone, tmp_path):
    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    a = extract_features(tiny_backbone, src, tmp_path / "a", batch_size=7, num_workers=0,
                         progress=False)
    b = extract_features(tiny_backbone, src, tmp_path / "b", batch_size=16, num_workers=2,
                         progress=False)
    np.testing.assert_allclose(np.asarray(a.features, np.float32),
                               np.asarray(b.features, np.float32), atol=2e-3)


def test_key_depends_on_weights_preprocessing_and_data(tiny_backbone, tmp_path):
    from robench.models.backbone import load_backbone

    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    other_data = cifar.load(write_cifar10(tmp_path / "d", n_test=41), name="c10")
    other_weights = load_backbone("robench-tiny-vit", None, device="cpu", seed=999)
    k = feature_key(tiny_backbone, src)
    assert k != feature_key(tiny_backbone, other_data)
    assert k != feature_key(other_weights, src)


def _folder_with_corrupt(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 9, 9)).save(tmp_path / cls / f"{i}.jpg")
    data = (tmp_path / "b" / "1.jpg").read_bytes()
    (tmp_path / "b" / "1.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    (tmp_path / "a" / "2.jpg").write_bytes(b"not an image at all")
    return folder.load(tmp_path, name="f")


def test_corrupt_images_counted_and_named(tiny_backbone, tmp_path):
    src = _folder_with_corrupt(tmp_path / "img")
    fs = extract_features(tiny_backbone, src, tmp_path / "cache", batch_size=4, num_workers=0,
                          progress=False)
    assert fs.bad == [2, 4]
    assert not np.asarray(fs.features[fs.bad]).any()
    assert np.asarray(fs.features[[0, 1, 3, 5]]).any(axis=1).all()


def test_corrupt_image_strict_fails_with_name(tiny_backbone, tmp_path):
    src = _folder_with_corrupt(tmp_path / "img")
    with pytest.raises(RobenchError, match="a/2.jpg"):
        extract_features(tiny_backbone, src, tmp_path / "cache", batch_size=8, num_workers=0,
                         progress=False, strict=True)
    assert not list((tmp_path / "cache" / "features").glob("*.npy"))  # nothing half-written


def test_random_views_are_seeded_per_image(tiny_backbone, tmp_path):
    from torchvision import transforms as T

    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    aug = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.ToTensor()])
    a = extract_features(tiny_backbone, src, tmp_path / "a", batch_size=8, num_workers=0,
                         progress=False, transform=aug, view="rrc-0", seed=0)
    b = extract_features(tiny_backbone, src, tmp_path / "b", batch_size=16, num_workers=2,
                         progress=False, transform=aug, view="rrc-0", seed=0)
    c = extract_features(tiny_backbone, src, tmp_path / "a", batch_size=8, num_workers=0,
                         progress=False, transform=aug, view="rrc-1", seed=1)
    np.testing.assert_allclose(np.asarray(a.features, np.float32),
                               np.asarray(b.features, np.float32), atol=2e-3)
    assert a.key != c.key and not np.allclose(a.features, c.features, atol=1e-2)
    with pytest.raises(ValueError, match="view name"):
        extract_features(tiny_backbone, src, tmp_path / "a", transform=aug)


def _per_image(backbone, src, idx) -> torch.Tensor:
    return torch.stack([backbone.preprocess(src.load_image(i)) for i in idx])


def test_array_sources_convert_whole_batches_bit_identically(tiny_backbone, tmp_path):
    """CIFAR's and CIFAR-C's uint8 rows skip the per-image PIL path when the preprocessing is
    ToTensor + Normalize at the images' size: the batches equal the per-image transform's bits,
    in order, shards included; the features are the same whichever path made them."""
    from robench.data import cifar_c
    from robench.features import _ArrayBatches, _Preprocessed, array_normalization, loader

    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    ds = _Preprocessed(src, tiny_backbone.preprocess)
    assert array_normalization(ds) is not None
    batches = loader(ds, tiny_backbone, batch_size=16, num_workers=2)
    assert isinstance(batches, _ArrayBatches) and len(batches) == 3  # 40 images
    seen = []
    for xs, idx, ok in batches:
        assert xs.dtype == torch.float32 and bool(ok.all())
        assert torch.equal(xs, _per_image(tiny_backbone, src, idx.tolist()))
        seen += idx.tolist()
    assert seen == list(range(len(src)))
    shard = [[5, 3, 39], [0]]  # a rank's batches (any order)
    got = [(xs, idx.tolist()) for xs, idx, _ in loader(ds, tiny_backbone, 16, 0, shard)]
    assert [i for _, i in got] == shard
    assert all(torch.equal(xs, _per_image(tiny_backbone, src, i)) for xs, i in got)
    # the features: identical to the DataLoader's (forced by a loader without ``batch``)
    fast = extract_features(tiny_backbone, src, tmp_path / "a", batch_size=16, num_workers=0,
                            progress=False)
    slow_src = cifar.load(tmp_path / "c", name="c10")
    pixels = slow_src.loader.pixels
    slow_src.loader = lambda i: Image.fromarray(pixels[i])
    assert array_normalization(_Preprocessed(slow_src, tiny_backbone.preprocess)) is None
    slow = extract_features(tiny_backbone, slow_src, tmp_path / "b", batch_size=16,
                            num_workers=0, progress=False)
    np.testing.assert_array_equal(fast.features, slow.features)
    # CIFAR-C rows span several corruption files
    root = tmp_path / "c10c"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "labels.npy", np.repeat(np.arange(5), 2).astype(np.int64))
    for c in cifar_c.STANDARD_CORRUPTIONS:
        np.save(root / f"{c}.npy", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    csrc = cifar_c.load(root, name="c10c", options=cifar_c.CifarCOptions(corruptions="standard"))
    idx = np.array([0, 9, 10, 149, 77, 11])
    np.testing.assert_array_equal(csrc.loader.batch(idx),
                                  np.stack([np.asarray(csrc.load_image(i)) for i in idx]))
    xs = next(iter(loader(_Preprocessed(csrc, tiny_backbone.preprocess), tiny_backbone, 0, 0,
                          [idx.tolist()])))[0]
    assert torch.equal(xs, _per_image(tiny_backbone, csrc, idx))


def test_other_preprocessing_decodes_image_by_image(tiny_backbone, tmp_path):
    """A resize to another size, an augmentation, a seeded view or an unknown step: no array
    shortcut (its arithmetic would not be the transform's)."""
    import torchvision.transforms as T

    from robench.features import _Preprocessed, array_normalization

    src = cifar.load(write_cifar10(tmp_path / "c"), name="c10")
    pre = tiny_backbone.preprocess
    norm = pre.transforms[-1]
    for transform in (T.Compose([T.Resize(48), T.ToTensor(), norm]),
                      T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), norm]),
                      T.Compose([T.ToTensor(), T.Lambda(lambda x: x * 2), norm]),
                      T.Compose([T.ToTensor()]), lambda im: pre(im)):
        assert array_normalization(_Preprocessed(src, transform)) is None, transform
    assert array_normalization(_Preprocessed(src, pre, seed=0)) is None
    assert array_normalization(_Preprocessed(src, pre)) is not None
