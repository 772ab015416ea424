"""ImageNet-family label rules on fixtures in the exact released layouts.

With ``shared/realdata/imagenet`` present the fixtures are made of its 1000 REAL ImageNet images
(``<wnid>_<label>.JPEG``, one per class) and every label is checked against the public wnid ->
index table; without it, small generated images stand in and the realdata-only checks skip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REALDATA
from PIL import Image

from robench.data import imagenet, load_dataset
from robench.errors import RobenchError
from robench.features import FeatureSet
from robench.models.heads import LinearHead
from robench.registry import DATASETS
from robench.scoring import cell_outputs, scored_columns

REAL = REALDATA / "imagenet"
HAVE_REAL = (REAL / "sample_1k_index.csv").is_file()
needs_real = pytest.mark.skipif(not HAVE_REAL, reason="shared/realdata/imagenet not present")
TINY_IMAGES = 1000


# -- fixture builders (also used by test_verify.py) --------------------------------------------
def imagenet_samples(folder: Path) -> list[tuple[str, int, Path]]:
    """(wnid, 1k label, image file) for every class: the real images when present, else small
    generated JPEGs whose colour encodes the label."""
    if HAVE_REAL:
        with open(REAL / "sample_1k_index.csv") as f:
            return [(r["wnid"], int(r["class_index"]), REAL / "sample_1k" / r["file"])
                    for r in csv.DictReader(f)]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label, wnid in enumerate(imagenet.imagenet_wnids()):
        p = folder / f"{wnid}_{label}.JPEG"
        Image.new("RGB", (24, 20), (label % 256, label // 256 * 60, 128)).save(p)
        out.append((wnid, label, p))
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def make_folder_set(root: Path, samples: list, wnids: set[str] | None = None,
                    ext: str = ".JPEG") -> Path:
    """``root/<wnid>/<file><ext>`` (val / R / A / Sketch layout), one image per class."""
    for wnid, _, path in samples:
        if wnids is None or wnid in wnids:
            _link(path, root / wnid / f"{path.stem}{ext}")
    return root


def make_v2(root: Path, samples: list) -> Path:
    """``root/<k>/<hash>.jpeg`` with k = the 1k label (ImageNet-V2 layout)."""
    for _, label, path in samples:
        _link(path, root / str(label) / f"{abs(hash(path.name)) % 10**12:012x}.jpeg")
    return root


def load(name: str, root: Path, **options):
    spec = DATASETS[name]
    return load_dataset(spec.family, root, name, {**spec.options, **options})


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> list[tuple[str, int, Path]]:
    return imagenet_samples(tmp_path_factory.mktemp("imagenet-images"))


@pytest.fixture(scope="session")
def table() -> dict[str, int]:
    """wnid -> 1k index, from the public class index when present, else the shipped list."""
    if HAVE_REAL:
        d = json.loads((REAL / "imagenet_class_index.json").read_text())
        return {v[0]: int(k) for k, v in d.items()}
    return imagenet.wnid_index()


def _wnid_of(path: str) -> str:
    return Path(path).parts[0]


# -- metadata -----------------------------------------------------------------------------------
def test_shipped_wnid_table_is_the_1k_order(table):
    wnids = imagenet.imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)  # => "sorted wnid" and "1k index" are the same rule
    assert {w: i for i, w in enumerate(wnids)} == table


@needs_real
def test_shipped_200_class_lists_match_the_public_ones():
    for subset, fname in [("imagenet-r", "imagenet_r_200.json"),
                          ("imagenet-a", "imagenet_a_200.json")]:
        ref = json.loads((REAL / fname).read_text())
        assert list(imagenet.subset_wnids(subset)) == ref["wnids"]
        assert imagenet.subset_indices(subset) == sorted(ref["imagenet1k_indices"])


def test_r_and_a_are_different_200_class_lists():
    r, a = set(imagenet.subset_wnids("imagenet-r")), set(imagenet.subset_wnids("imagenet-a"))
    assert len(r) == len(a) == 200 and r != a
    assert len(r & a) == 86
    with pytest.raises(RobenchError, match="Did you mean 'imagenet-r'"):
        imagenet.subset_wnids("imagenet-rr")


def test_classnames_come_from_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert imagenet.imagenet_classnames() == tuple(IMAGENET_CLASSNAMES)


def test_cifar100_classnames_torchvision_order_with_spaces():
    from robench.data.cifar_c import CIFAR_CLASSNAMES

    raw = (Path(imagenet.METADATA) / "cifar100_classes.txt").read_text().split()
    assert len(raw) == 100 and raw == sorted(raw) and raw[:3] == ["apple", "aquarium_fish", "baby"]
    names = CIFAR_CLASSNAMES["cifar100"]
    assert names[1] == "aquarium fish" and names[-1] == "worm" and "_" not in "".join(names)


# -- imagenet val -------------------------------------------------------------------------------
def test_val_labels_are_sorted_wnid_indices(tmp_path, samples, table):
    root = make_folder_set(tmp_path / "imagenet" / "val", samples)
    src = load("imagenet", root)
    assert len(src) == 1000 and src.class_subset is None
    assert src.classnames == list(imagenet.imagenet_classnames())
    for rel, label in zip(src.info["paths"], src.labels, strict=True):
        assert label == table[_wnid_of(rel)]
    # the registry accepts the root one level up (imagenet/ holding val/): same files, same hash
    up = load("imagenet", tmp_path / "imagenet")
    assert up.manifest_hash == src.manifest_hash and up.info["root"] == str(root)
    assert src.load_image(5).mode == "RGB"


@needs_real
def test_val_labels_and_names_match_the_realdata_index(tmp_path, samples):
    src = load("imagenet", make_folder_set(tmp_path / "val", samples))
    with open(REAL / "sample_1k_index.csv") as f:
        rows = {r["wnid"]: r for r in csv.DictReader(f)}
    for rel, label in zip(src.info["paths"], src.labels, strict=True):
        row = rows[_wnid_of(rel)]
        assert label == int(row["class_index"])
        assert src.classnames[label] == row["openai_clip_classname"]


# -- imagenet-v2 --------------------------------------------------------------------------------
def test_v2_label_is_int_of_folder_not_string_sort_position(tmp_path, samples, table):
    top = tmp_path / "imagenetv2-matched-frequency-format-val"
    make_v2(top, samples)
    src = load("imagenet-v2-matched-frequency", top)
    assert len(src) == 1000 and src.class_subset is None
    for rel, label in zip(src.info["paths"], src.labels, strict=True):
        assert label == int(Path(rel).parts[0])
    # what a naive ImageFolder would do: sort the folder names as strings
    string_sorted = sorted(os.listdir(top))
    assert string_sorted.index("10") == 2
    in_10 = [y for rel, y in zip(src.info["paths"], src.labels, strict=True)
             if rel.startswith("10/")]
    assert in_10 == [10]
    # and the image in folder k is an image of class k (its wnid's 1k index)
    by_label = {label: wnid for wnid, label, _ in samples}
    assert all(table[by_label[y]] == y for y in src.labels)
    # root pointing at the folder the tar was extracted into works too
    assert load("imagenet-v2-matched-frequency", tmp_path).manifest_hash == src.manifest_hash
    assert load("imagenet-v2-threshold-0.7", tmp_path).manifest_hash == src.manifest_hash


@pytest.mark.parametrize(("folders", "needle"), [
    (["n01440764", "n01443537"], "imagenet-v2 folders are wnids; expected 0..999"),
    (["0", "1", "010"], "not all class indices 0..999 (unexpected: 010)"),
    (["0", "1000"], "unexpected: 1000"),
    (["0", "extra"], "unexpected: extra"),
    (["train"], "no class folders 0..999"),
])
def test_v2_layout_errors(tmp_path, samples, folders, needle):
    for d in folders:
        _link(samples[0][2], tmp_path / "v2" / d / "x.jpeg")
    with pytest.raises(RobenchError) as e:
        load("imagenet-v2-matched-frequency", tmp_path / "v2")
    assert needle in e.value.problem and e.value.fix


# -- imagenet-r / -a: 200-way scoring -----------------------------------------------------------
@pytest.mark.parametrize("name", ["imagenet-r", "imagenet-a"])
def test_r_a_labels_are_1k_indices_scored_over_their_200(tmp_path, samples, table, name):
    wnids = set(imagenet.subset_wnids(name))
    make_folder_set(tmp_path / name / name, samples, wnids, ext=".jpg")
    src = load(name, tmp_path / name)  # the tar's top folder is found below the root
    assert len(src) == 200 and len(src.classnames) == 1000
    subset = imagenet.subset_indices(name)
    assert src.class_subset == subset == sorted(table[w] for w in wnids)
    for rel, label in zip(src.info["paths"], src.labels, strict=True):
        assert label == table[_wnid_of(rel)]
    # 1000-way logits whose argmax is a class outside the 200, but the true class is the best
    # of the 200: the restricted (200-way) prediction is right, the 1000-way one wrong
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(src), 1000)).astype(np.float32)
    logits[np.arange(len(src)), src.labels] = 10.0
    outside = next(c for c in range(1000) if c not in set(subset))
    logits[:, outside] = 20.0
    columns, target = scored_columns(src)
    assert list(columns) == subset
    np.testing.assert_array_equal(columns[target], src.labels)
    # features = the logits and an identity head: the cell scores exactly these logits
    head = LinearHead(np.eye(1000, dtype=np.float32), 1.0, list(src.classnames))
    out = cell_outputs(head, FeatureSet(logits, [], "k", False), src)
    assert out.samples.num_classes == 200
    assert (out.samples.label_rank == 0).all()  # right over the 200
    np.testing.assert_array_equal(out.scored_classes[out.samples.topk_index[:, 0]], src.labels)
    np.testing.assert_array_equal(out.label, src.labels)  # stored in the 1k label space
    assert (logits.argmax(1) != src.labels).all()  # wrong over the 1000


def test_r_and_a_confusion_is_named(tmp_path, samples):
    make_folder_set(tmp_path / "r", samples, set(imagenet.subset_wnids("imagenet-r")), ".jpg")
    with pytest.raises(RobenchError) as e:
        load("imagenet-a", tmp_path / "r")
    assert "not among the 200 ImageNet-A classes" in e.value.problem
    assert "is this ImageNet-R?" in e.value.problem
    assert "data.imagenet-a.root" in e.value.fix


def test_partial_r_keeps_the_full_200_way_scoring(tmp_path, samples):
    wnids = sorted(imagenet.subset_wnids("imagenet-r"))[:50]
    src = load("imagenet-r", make_folder_set(tmp_path / "r", samples, set(wnids), ".jpg"))
    assert len(src) == 50 and len(src.class_subset) == 200
    assert len(src.info["missing_classes"]) == 150


# -- imagenet-sketch ----------------------------------------------------------------------------
def test_sketch_under_sketch_folder(tmp_path, samples, table):
    make_folder_set(tmp_path / "imagenet-sketch" / "sketch", samples)
    src = load("imagenet-sketch", tmp_path / "imagenet-sketch")
    assert len(src) == 1000 and src.class_subset is None
    assert src.info["root"] == str(tmp_path / "imagenet-sketch" / "sketch")
    for rel, label in zip(src.info["paths"], src.labels, strict=True):
        assert label == table[_wnid_of(rel)]


# -- bad roots: precise problem and fix ---------------------------------------------------------
def _error(name: str, root: Path, **options) -> RobenchError:
    with pytest.raises(RobenchError) as e:
        load(name, root, **options)
    assert e.value.fix, "every error carries a fix"
    return e.value


def test_bad_roots_are_explained(tmp_path, samples):
    e = _error("imagenet", tmp_path / "nowhere")
    assert "does not exist" in e.problem and "data.imagenet.root" in e.fix
    assert "robench data download imagenet" in e.fix

    (tmp_path / "imagenet-r.tar").write_bytes(b"x")
    e = _error("imagenet-r", tmp_path / "imagenet-r.tar")
    assert "is a file" in e.problem and "extract it first" in e.problem

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        os.symlink(samples[i][2], flat / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    e = _error("imagenet", flat)
    assert "flat ILSVRC2012_val_*.JPEG release" in e.problem and "devkit" in e.fix

    top = tmp_path / "ilsvrc"
    make_folder_set(top / "val", samples[:3])
    (top / "train").mkdir()
    e = _error("imagenet", top, nested=[])
    assert f"{top / 'val'} has them" in e.problem and f"data.imagenet.root={top / 'val'}" in e.fix

    v2 = make_v2(tmp_path / "v2", samples[:3])
    e = _error("imagenet", v2)
    assert "integers" in e.problem and "imagenet-v2-*" in e.fix

    mixed = make_folder_set(tmp_path / "mixed", samples[:3])
    (mixed / "README_extra").mkdir()
    e = _error("imagenet", mixed)
    assert "README_extra" in e.problem

    odd = make_folder_set(tmp_path / "odd", samples[:2])
    _link(samples[0][2], odd / "n99999999" / "x.JPEG")
    e = _error("imagenet", odd)
    assert "not ImageNet-1k wnids: n99999999" in e.problem

    empty = tmp_path / "empty" / samples[0][0]
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    e = _error("imagenet", empty.parent)
    assert "hold no images" in e.problem


def test_hidden_and_non_image_entries_are_skipped(tmp_path, samples):
    root = make_folder_set(tmp_path / "val", samples[:4])
    (root / ".ipynb_checkpoints").mkdir()
    (root / samples[0][0] / "Thumbs.db").write_text("x")
    src = load("imagenet", root)
    assert len(src) == 4 and src.info["skipped_files"] == [f"{samples[0][0]}/Thumbs.db"]


# -- cifar100-c ---------------------------------------------------------------------------------
def test_cifar100_c_registry_entry(tmp_path):
    from robench.data.corruptions import STANDARD_CORRUPTIONS

    root = tmp_path / "CIFAR-100-C"
    root.mkdir()
    labels = np.arange(20) * 5 + 4  # 20 test images per severity, labels up to 99
    np.save(root / "labels.npy", np.tile(labels, 5))
    x = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    for c in STANDARD_CORRUPTIONS:
        np.save(root / f"{c}.npy", x)
    src = load("cifar100-c", root)
    assert len(src.classnames) == 100 and src.classnames[1] == "aquarium fish"
    assert src.labels[:20].tolist() == labels.tolist() and len(src) == 15 * 100
    assert DATASETS["cifar100-c"].n_expected == 19 * 50000


# -- the suite ----------------------------------------------------------------------------------
SHIFTS = ["imagenet", "imagenet-v2-matched-frequency", "imagenet-r", "imagenet-sketch",
          "imagenet-a"]


def make_all(data: Path, samples: list) -> Path:
    """Every dataset of suites/imagenet-shifts.yaml at its default place under ``data``."""
    make_folder_set(data / "imagenet" / "val", samples)
    make_v2(data / "imagenetv2-matched-frequency-format-val", samples)
    for name in ("imagenet-r", "imagenet-a"):
        make_folder_set(data / name, samples, set(imagenet.subset_wnids(name)), ext=".jpg")
    make_folder_set(data / "imagenet-sketch" / "sketch", samples)
    return data


def test_suite_declares_the_shifts_and_resolves_roots(tmp_path, samples, monkeypatch):
    from robench.config import load_suite
    from robench.runner import Runner

    data = make_all(tmp_path / "data", samples)
    monkeypatch.setenv("ROBENCH_DATA", str(data))
    cfg = load_suite("imagenet-shifts", [f"data.imagenet-a.root={data / 'imagenet-a'}"])
    assert list(cfg.models) == ["clip-vit-b32-openai"] and list(cfg.datasets) == SHIFTS
    assert cfg.id_dataset == "imagenet" and cfg.data_root == str(data)
    runner = Runner(cfg)
    for name in SHIFTS:
        src = runner.source(name)
        assert len(src) == (200 if name in ("imagenet-r", "imagenet-a") else 1000)
        assert src.classnames == list(imagenet.imagenet_classnames())
        assert runner.dataset_specs[name].templates == "imagenet"
    assert runner.source("imagenet-r").class_subset != runner.source("imagenet-a").class_subset


def test_suite_with_a_wrong_root_fails_before_any_model_is_loaded(tmp_path, monkeypatch,
                                                                  capsys):
    import robench.models.backbone
    from robench.cli import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(robench.models.backbone, "load_backbone", no_model)
    # (tiny-random: the openai weights are not cached here, and missing weights fail first)
    rc = main(["run", "suite=imagenet-shifts", "models=[tiny-random]",
               f"data_root={tmp_path / 'none'}",
               f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"imagenet: dataset folder {tmp_path / 'none' / 'imagenet' / 'val'} does not exist" \
        in err
    assert "fix: set data.imagenet.root" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # no model, no features


def test_suite_end_to_end_records_the_scored_classes(tmp_path, samples, monkeypatch, capsys):
    """A tiny random model through the whole suite: records say which classes were scored, each
    class is encoded once, and ImageNet-R/-A alone encode only their own 200 classes.
    (The text encoder is replaced by random per-class vectors to keep this quick; the per-class
    cache and the heads assembled from it are the real ones.)"""
    import hashlib

    import robench.models.zeroshot as zs
    from robench.cli import main

    encoded: list[list[str]] = []

    def fake_encode(backbone, classnames, templates, progress=True, max_prompts=None):
        assert len(templates) == 80
        encoded.append(list(classnames))
        seeds = [int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) for c in classnames]
        w = np.stack([np.random.default_rng(s).normal(size=32) for s in seeds])
        return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(zs, "encode_classes", fake_encode)
    data = make_all(tmp_path / "data", samples[::5])  # 200 classes' images keep it quick
    common = ["models=[tiny-random]", f"data_root={data}", f"cache_dir={tmp_path / 'cache'}",
              "device=cpu", "model.batch_size=64", "model.num_workers=0", "metrics.bootstrap=0",
              "progress=false"]
    rc = main(["run", "suite=imagenet-shifts", f"results_dir={tmp_path / 'r'}", *common])
    assert rc == 0, capsys.readouterr().err[-3000:]
    names = imagenet.imagenet_classnames()
    # every class encoded once, whichever dataset met it first
    assert sorted(c for e in encoded for c in e) == sorted(set(names))
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r").rglob("*.json")
            if p.name != "analysis.json"]  # the suite's analysis sits beside the records
    by_ds = {rec["dataset"]: rec for rec in recs}
    assert set(by_ds) == set(SHIFTS)
    for name in ("imagenet-r", "imagenet-a"):
        p = by_ds[name]["protocol"]
        assert p["scored_classes"] == imagenet.subset_indices(name)
        assert p["n_classes_scored"] == 200
        assert by_ds[name]["data"]["n"] == sum(1 for w, _, _ in samples[::5]
                                               if w in set(imagenet.subset_wnids(name)))
    for name in ("imagenet", "imagenet-v2-matched-frequency", "imagenet-sketch"):
        assert by_ds[name]["protocol"]["scored_classes"] == "all"
        assert by_ds[name]["protocol"]["n_classes_scored"] == 1000

    # a cold text cache, R and A first: each encodes only the classes it scores and has not seen
    shutil.rmtree(tmp_path / "cache" / "text")
    encoded.clear()
    rc = main(["run", "suite=imagenet-shifts", f"results_dir={tmp_path / 'r2'}", *common,
               "datasets=[imagenet-r,imagenet-a,imagenet]"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    r, a = ({names[i] for i in imagenet.subset_indices(n)} for n in ("imagenet-r", "imagenet-a"))
    assert [set(e) for e in encoded] == [r, a - r, set(names) - r - a]
    for name in ("imagenet-r", "imagenet-a"):  # per-sample outputs as in the first run, ID
        old = next((tmp_path / "r").rglob(f"{name}.npz"))  # pairing (ood_id_conf) included
        new = next((tmp_path / "r2").rglob(f"{name}.npz"))
        with np.load(old) as zo, np.load(new) as zn:
            assert set(zo.files) == set(zn.files) and "ood_id_conf" in zo.files
            for k in zo.files:
                np.testing.assert_array_equal(zo[k], zn[k])


def test_registry_entries():
    expected = {"imagenet": 50000, "imagenet-v2-matched-frequency": 10000,
                "imagenet-v2-threshold-0.7": 10000, "imagenet-v2-top-images": 10000,
                "imagenet-r": 30000, "imagenet-a": 7500, "imagenet-sketch": 50889}
    for name, n in expected.items():
        spec = DATASETS[name]
        assert spec.n_expected == n and spec.templates == "imagenet"
        assert spec.family == ("imagenet-v2" if "v2" in name else "imagenet-folder")
    assert DATASETS["imagenet-r"].options["subset"] == "imagenet-r"
    assert DATASETS["imagenet-a"].options["subset"] == "imagenet-a"
