"""Dataset families in their real on-disk layouts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CIFAR10_NAMES, cifar_pixels, write_cifar10
from PIL import Image

from robench.data import cifar, folder
from robench.errors import RobenchError


def test_cifar_pickle_layout_labels_and_pixels(tmp_path):
    root = write_cifar10(tmp_path / "c10", n_test=30)
    src = cifar.load(root, name="cifar10")
    x, y = cifar_pixels(30)
    assert len(src) == 30
    np.testing.assert_array_equal(src.labels, y)
    assert src.classnames == CIFAR10_NAMES
    np.testing.assert_array_equal(np.asarray(src.load_image(7)), x[7])
    # pointing at the batches folder itself works too, with the same manifest
    assert cifar.load(root / "cifar-10-batches-py", name="cifar10").manifest_hash == \
        src.manifest_hash
    train = cifar.load(root, name="cifar10-train", train=True)
    assert len(train) == 50 and train.manifest_hash != src.manifest_hash


def test_cifar_missing_files_named(tmp_path):
    root = write_cifar10(tmp_path / "c10")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(RobenchError) as e:
        cifar.load(root, name="cifar10")
    assert "test_batch" in str(e.value) and "robench data download cifar10" in str(e.value)
    with pytest.raises(RobenchError, match="lacks"):
        cifar.load(tmp_path / "nowhere", name="cifar10")


def test_folder_layout(tmp_path):
    for cls, n in [("b_class", 2), ("a_class", 3)]:
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a_class" / "notes.txt").write_text("ignored")
    src = folder.load(tmp_path, name="f")
    assert src.classnames == ["a class", "b class"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1]
    assert src.load_image(4).size == (8, 8)
    h = src.manifest_hash
    Image.new("RGB", (9, 9)).save(tmp_path / "b_class" / "new.png")
    assert folder.load(tmp_path, name="f").manifest_hash != h


def test_folder_errors(tmp_path):
    with pytest.raises(RobenchError, match="does not exist"):
        folder.load(tmp_path / "missing", name="f")
    with pytest.raises(RobenchError, match="no class folders"):
        folder.load(tmp_path, name="f")


def test_shipped_subset_is_real_cifar():
    from robench.registry import ASSETS

    src = folder.load(ASSETS / "cifar10-subset" / "test", name="t")
    assert len(src) == 2000 and src.classnames == CIFAR10_NAMES
    assert np.bincount(src.labels).tolist() == [200] * 10
