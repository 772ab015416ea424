"""Dataset families in their real on-disk layouts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CIFAR10_NAMES, cifar_pixels, run_cli, write_cifar10
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
    train = cifar.load(root, name="cifar10-train", options=cifar.CifarOptions(train=True))
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


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted CIFAR batch could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    from robench.data import verify
    from robench.registry import DATASETS

    root = write_cifar10(tmp_path / "c10", n_test=10)
    marker = tmp_path / "pwned"
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, f)
    with pytest.raises(RobenchError, match="test_batch is not a CIFAR batch file, refused: "
                       "it names posix.system"):
        cifar.load(root, name="cifar10")
    report = verify.verify_dataset("cifar10", DATASETS["cifar10"], root,
                                   cache_dir=tmp_path / "cache", progress=False)
    assert [c.status for c in report.checks if c.what == "checksum"] == ["FAIL"]
    assert any(c.what == "layout" and "refused" in c.detail for c in report.checks)
    assert not marker.exists()  # neither the run's reader nor `data verify` executed it
    r = run_cli("data", "verify", "cifar10", f"data.cifar10.root={root}",
                f"cache_dir={tmp_path / 'cache'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr and not marker.exists()


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 10], r"labels \[10\] are outside 0..9"),
    ([0, -1], r"labels \[-1\] are outside"),
    ([0.0, 1.5], "not integer class indices"),
])
def test_labels_are_validated(labels, message):
    from robench.data.base import ImageSource

    with pytest.raises(RobenchError, match=message):
        ImageSource("d", np.asarray(labels), [str(i) for i in range(10)], "h", None)


def test_folder_family_skips_what_is_not_a_class_and_says_so(tmp_path, caplog):
    import os

    root = tmp_path / "d"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / c / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "empty").mkdir()
    os.symlink(".", root / "selfdir")
    os.symlink("..", root / "updir")
    Image.new("RGB", (8, 8)).save(root / "cat" / "._0.png")  # macOS metadata, not an image
    src = folder.load(root, name="d")
    assert src.classnames == ["cat", "dog"] and len(src) == 4
    for name in (".ipynb_checkpoints (hidden)", "empty (no images)", "selfdir (a link",
                 "updir (a link"):
        assert name in caplog.text
    os.symlink("loop", root / "loop")
    assert folder.load(root, name="d").classnames == ["cat", "dog"]
    assert "loop (a broken or looping link)" in caplog.text
    with pytest.raises(RobenchError, match="has no class folders with images"):
        folder.load(root / "empty", name="d")


def test_cifar_release_table_is_torchvisions():
    """robench keeps the release's file list and md5 sums as data (importing torchvision costs
    seconds); they must be torchvision's."""
    from torchvision.datasets import CIFAR10, CIFAR100

    from robench.data.cifar import RELEASES

    for name, tv in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        ours = RELEASES[name]
        assert ours.base_folder == tv.base_folder and ours.meta == tv.meta
        assert [list(f) for f in ours.train_list] == tv.train_list
        assert [list(f) for f in ours.test_list] == tv.test_list
