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
