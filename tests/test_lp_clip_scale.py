"""LP-CLIP at scale: online strong views (fresh per epoch, encoded in the training loop), the
seeded label-free subset, and the strong-view budget printed before the work starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LabelFree, reachable, same_outputs, shipped_val, with_hidden_split

from robench.config import load_suite
from robench.data.base import ImageSource
from robench.data.folder import load as load_folder
from robench.errors import RobenchError
from robench.features import cached_features, extract_features
from robench.methods.lp_clip import LPCLIP, LPCLIPOptions
from robench.models import lp_clip as LPC
from robench.models.zeroshot import class_embeddings
from robench.registry import ASSETS, template_set
from robench.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops take microseconds, and OpenMP threads on
    shared cores make them several times slower (measured 1.6 s vs 9.8 s for one online fit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _opts(**kw) -> LPCLIPOptions:
    return LPCLIPOptions.parse({"train_on": "hidden", **kw}, model="m", method="lp-clip")


@pytest.fixture(scope="module")
def small(tiny_backbone, tmp_path_factory):
    """96 seeded images of the shipped val split behind the label firewall, their weak view
    and the zero-shot weights: what the online tests train on."""
    cache = tmp_path_factory.mktemp("lpclip-scale")
    train = LPC.training_split(LPC.Unlabelled(LabelFree(shipped_val())), 96, seed=1)
    weak = extract_features(tiny_backbone, train, cache, num_workers=0, progress=False)
    w_zs = class_embeddings(tiny_backbone, train.classnames, template_set("cifar"), cache,
                            progress=False)
    return train, weak, w_zs


def _online(backbone, train, seed: int = 5, workers: int = 0, views: int = 2):
    tf = LPC.strong_transform(backbone)
    return LPC.OnlineViews(backbone, train, tf, views, seed, num_workers=workers)


CFG = LPC.LPCLIPConfig(lr=0.02, rounds=2, epochs=2, batch_size=32, init="random", bias=True)


# -- online views -------------------------------------------------------------------------------
def test_online_training_is_seeded_and_independent_of_the_worker_count(tiny_backbone, small):
    train, weak, w_zs = small
    scale = tiny_backbone.logit_scale

    def fit(seed: int = 5, workers: int = 0):
        return LPC.self_train(weak.features, _online(tiny_backbone, train, seed, workers), w_zs,
                              scale, CFG, seed=3)

    a, b, two = fit(), fit(), fit(workers=2)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.history == b.history
    np.testing.assert_array_equal(a.weight, two.weight)  # 2 DataLoader workers: same views
    np.testing.assert_array_equal(a.bias, two.bias)
    assert a.history == two.history
    other = fit(seed=6)  # another view seed: other views, other weights
    assert not np.array_equal(a.weight, other.weight)
    # every epoch of every round encoded K fresh views of each image, and training moved W
    assert [h["encoded"] for h in a.history] == [96 * 2 * CFG.epochs] * CFG.rounds
    assert [h["steps"] for h in a.history] == [CFG.epochs * 6] * 2  # 16 images x 2 views / step
    assert not np.array_equal(a.weight, w_zs) and np.isfinite(a.weight).all()
    assert a.history[0]["agreement_after"] > a.history[0]["agreement_before"]


def test_online_training_leaves_the_global_generator_alone(tiny_backbone, small):
    train, weak, w_zs = small
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    LPC.self_train(weak.features, _online(tiny_backbone, train), w_zs,
                   tiny_backbone.logit_scale, LPC.LPCLIPConfig(epochs=1, rounds=1), seed=0)
    assert torch.equal(torch.rand(3), expected)  # in-process augmentation reseeds, then restores


def _epoch(views, index: int, batch: int = 32, seed: int = 0) -> dict[int, np.ndarray]:
    """row -> its features in one epoch (K rows for online views, one per pair for cached)."""
    out: dict[int, list[np.ndarray]] = {}
    for f, rows in views.epoch(index, batch, torch.Generator().manual_seed(seed)):
        for x, r in zip(f.numpy(), rows.tolist(), strict=True):
            out.setdefault(r, []).append(x)
    return {r: np.stack(v) for r, v in out.items()}


def test_online_views_are_fresh_each_epoch_and_reproducible(tiny_backbone, small):
    train = small[0]
    views = _online(tiny_backbone, train)
    e0, again, e1 = _epoch(views, 0), _epoch(views, 0), _epoch(views, 1)
    assert sorted(e0) == sorted(e1) == list(range(96))  # every image, each epoch
    assert all(v.shape == (2, 32) for v in e0.values())  # K views of each
    for r in e0:
        np.testing.assert_array_equal(e0[r], again[r])  # the same epoch: the same views
        assert not np.allclose(e0[r], e1[r])  # the next epoch: fresh views of every image
        assert not np.allclose(e0[r][0], e0[r][1])  # two different views in one epoch
    # the image order comes from the training generator, the views do not depend on it
    shuffled = _epoch(views, 0, seed=9)
    for r in e0:
        np.testing.assert_array_equal(e0[r], shuffled[r])


def test_cached_views_are_the_same_features_every_epoch():
    strong = torch.randn(2, 50, 8)
    views = LPC.CachedViews(strong)
    for epoch in (0, 1, 5):
        seen = []
        for f, rows in views.epoch(epoch, 16, torch.Generator().manual_seed(epoch)):
            for x, r in zip(f, rows.tolist(), strict=True):
                (k,) = [k for k in range(2) if torch.equal(x, strong[k, r])]  # a stored view
                seen.append((k, r))
        assert sorted(seen) == [(k, r) for k in range(2) for r in range(50)]  # each pair once


class Broken(LabelFree):
    """The images at ``bad`` cannot be decoded."""

    def __init__(self, source, bad: tuple[int, ...]) -> None:
        super().__init__(source)
        self.bad = bad

    def load_image(self, i: int):
        if i in self.bad:
            raise OSError("truncated file")
        return super().load_image(i)


def test_undecodable_images_are_left_out_of_online_training(tiny_backbone, tmp_path):
    from robench.methods.base import Settings

    split = LPC.Unlabelled(Broken(shipped_val(), bad=(3, 7)))
    views = _online(tiny_backbone, split.subset(np.arange(10)))
    assert sorted(_epoch(views, 0)) == [0, 1, 2, 4, 5, 6, 8, 9]  # rows 3 and 7 yield nothing
    assert views.encoded == 8 * 2
    rows = LPC.subset_rows(500, 40, seed=2)
    train = LPC.training_split(LPC.Unlabelled(Broken(shipped_val(), bad=(rows[5], rows[11]))),
                               40, seed=2)
    run = Settings(cache_dir=str(tmp_path), device="cpu", batch_size=64, num_workers=0)
    weak, keep, online = LPC._online_training(tiny_backbone, train, str(tmp_path), _opts(),
                                              0, run, False)
    assert weak.bad == [5, 11] and 5 not in keep and 11 not in keep
    assert len(keep) == online.n == 38  # teacher rows and online views: the same 38 images


def test_what_the_online_workers_get_has_no_route_to_labels(tiny_backbone):
    src = shipped_val()
    train = LPC.training_split(LPC.Unlabelled(src), 100, seed=0)
    dataset = _online(tiny_backbone, train).loader(0, [[0, 1]]).dataset  # pickled to workers
    reached = reachable(dataset)
    assert not any(isinstance(o, ImageSource) for o in reached)
    assert not any(o is src.labels or o is src.info for o in reached)
    assert not any(isinstance(o, np.ndarray) and o.shape == src.labels.shape
                   and np.issubdtype(o.dtype, np.integer) for o in reached)
    with pytest.raises(TypeError, match="Unlabelled"):  # a labelled source is refused
        LPC.OnlineViews(tiny_backbone, src, LPC.strong_transform(tiny_backbone), 2, 0)


# -- subset -------------------------------------------------------------------------------------
def test_subset_is_a_seeded_uniform_choice_of_distinct_images():
    a, b, c = (LPC.subset_rows(1000, 100, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == 100 and len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert 0 <= a.min() and a.max() < 1000
    assert LPC.subset_rows(1000, 0, 0) is None and LPC.subset_rows(1000, 1000, 0) is None
    src = shipped_val()
    split = LPC.Unlabelled(src)
    part = LPC.training_split(split, 40, seed=7)
    rows = LPC.subset_rows(500, 40, 7)
    assert len(part) == 40 and part.split_size == 500 and part.name == f"{src.name}-subset40"
    assert part.manifest_hash not in (split.manifest_hash,
                                      LPC.training_split(split, 40, seed=8).manifest_hash)
    assert np.array_equal(np.asarray(part.load_image(3)), np.asarray(src.load_image(rows[3])))
    assert LPC.training_split(split, 0, seed=7) is split
    with pytest.raises(RobenchError, match="must not read the labels"):
        _ = part.labels


def test_with_a_subset_the_runner_does_not_encode_the_whole_split():
    full = LPCLIP.from_declared({"train_on": "imagenet-train"})
    part = LPCLIP.from_declared({"train_on": "imagenet-train", "subset": 100_000})
    assert full.feature_datasets() == ["imagenet-train"]
    assert part.feature_datasets() == []  # lp-clip encodes the weak view of its subset itself


# -- the budget ---------------------------------------------------------------------------------
def test_the_budget_line_at_imagenet_scale():
    n = 1_281_167
    cached = LPC.Budget("cached", "imagenet-train", n, n, 2, 512, "float16", 10, 2, rate=400.0)
    assert cached.encodings == 2 * n and cached.disk_bytes == 2 * n * 512 * 2
    assert cached.seconds == pytest.approx(2 * n / 400)
    line = cached.line()
    assert "1,281,167 images x K=2 = 2,562,334 encodings" in line
    assert "disk 2,562,334 x 512 x 2 B (float16) = 2.6 GB" in line
    assert "time >= 1.8 h at the weak view's measured 400.0 img/s" in line
    assert "subset" not in line
    online = LPC.Budget("online", "imagenet-train", n, n, 2, 512, "float16", 10, 2, rate=400.0)
    assert online.encodings == 2 * n * 10 * 2 and online.disk_bytes == 0
    assert ("2,562,334 encodings per epoch x 10 epochs x 2 rounds = 51,246,680, nothing on "
            "disk; time >= 35.6 h") in online.line()
    part = LPC.Budget("cached", "imagenet-train", 100_000, n, 2, 768, "float32", 10, 2,
                      cached=1)
    assert part.encodings == 100_000 and part.disk_bytes == 200_000 * 768 * 4
    line = part.line()
    assert "100,000 images (a seeded subset of 1,281,167; not stratified" in line
    assert "(1 of 2 views cached: 100,000 to encode)" in line and "= 614.4 MB" in line
    assert "time unknown" in line


def test_feature_entries_record_their_extraction_time(tiny_backbone, tmp_path):
    src = load_folder(ASSETS / "cifar10-subset" / "val", name="v")
    assert cached_features(tiny_backbone, src, tmp_path) is None  # a lookup never extracts
    fresh = extract_features(tiny_backbone, src, tmp_path, num_workers=0, progress=False)
    again = cached_features(tiny_backbone, src, tmp_path)
    assert fresh.seconds is not None and fresh.seconds > 0 and not fresh.cached
    assert again.cached and again.seconds == pytest.approx(fresh.seconds, abs=1e-3)


# -- through the runner -------------------------------------------------------------------------
SUITE = """
models:
  - {{name: lpc, arch: robench-tiny-vit, method: lp-clip,
     options: {{train_on: hidden, views: 2, epochs: 2, rounds: 1, lr: 0.01, {extra}}}}}
datasets: [cifar10-subset-val]
model: {{num_workers: 0, batch_size: 250}}
metrics: {{bootstrap: 0}}
progress: false
"""


def _runner(tmp_path: Path, extra: str, *over: str, cache: Path | None = None) -> Runner:
    (tmp_path / "s.yaml").write_text(SUITE.format(extra=extra))
    cfg = load_suite(str(tmp_path / "s.yaml"),
                     [f"cache_dir={cache or tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}",
                      "device=cpu", "seed=123", "allow_train_on_eval=true", *over])
    return with_hidden_split(Runner(cfg))


def _summary(cache: Path) -> dict:
    (path,) = cache.glob("artifacts/lp-clip/*/summary.json")
    return json.loads(path.read_text())


def _entries(cache: Path) -> dict[str, int]:
    """feature entry -> rows."""
    return {p.stem: np.load(p, mmap_mode="r").shape[0] for p in cache.glob("features/*.npy")}


def test_online_run_reads_no_label_and_stores_no_view(tmp_path, capsys):
    _runner(tmp_path, "views_mode: online").run()
    cache = tmp_path / "c"
    assert list(_entries(cache).values()) == [500]  # the weak view only (shared with the eval)
    summary = _summary(cache)
    assert summary["views_mode"] == "online" and summary["n_train"] == 500
    assert summary["history"][0]["encoded"] == 500 * 2 * 2  # N x K x epochs
    out = capsys.readouterr().out
    assert ("lp-clip strong views (online) of cifar10-subset-val: 500 images x K=2 = 1,000 "
            "encodings per epoch x 2 epochs x 1 rounds = 2,000, nothing on disk") in out
    rec = json.loads((tmp_path / "r" / "s" / "lpc" / "cifar10-subset-val.json").read_text())
    assert rec["method"]["head"]["views_mode"] == "online"


def test_cached_subset_run_prints_its_budget_before_extracting(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    printed: list[tuple[str, dict[str, int]]] = []
    monkeypatch.setattr(LPC, "echo", lambda line: printed.append((line, _entries(cache))))
    _runner(tmp_path, "subset: 200").run()
    (line, before), = printed
    assert sorted(before.values()) == [200, 500]  # the subset's weak view, the eval set
    assert ("lp-clip strong views (cached) of cifar10-subset-val-subset200: 200 images (a "
            "seeded subset of 500; not stratified by class: that needs the labels) x K=2 = 400 "
            "encodings; disk 400 x 32 x 4 B (float32) = 51.2 KB; time >= ") in line
    assert "at the weak view's measured" in line  # timed: lp-clip extracted the weak view
    assert sorted(_entries(cache).values()) == [200, 200, 200, 500]  # + K strong views
    summary = _summary(cache)
    assert summary["n_train"] == 200 and summary["n_split"] == 500
    # another option, same views: they are reused, and the line says so
    printed.clear()
    _runner(tmp_path, "subset: 200, tau: 0.5").run()
    assert "(2 of 2 views cached: 0 to encode)" in printed[0][0]
    assert len(_entries(cache)) == 4


def test_views_are_stored_in_the_runs_features_dtype(tmp_path, capsys):
    """model.features_dtype=float16 halves the strong views' disk as it does the eval features':
    LP-CLIP's weak view is the eval run's own (shared) entry and its strong views are float16,
    which the budget line counts."""
    _runner(tmp_path, "subset: 200", "model.features_dtype=float16").run()
    cache = tmp_path / "c"
    dtypes = {p.name: np.load(p, mmap_mode="r").dtype for p in (cache / "features").glob("*.npy")}
    assert len(dtypes) == 4 and set(dtypes.values()) == {np.dtype(np.float16)}
    assert "disk 400 x 32 x 2 B (float16) = 25.6 KB" in capsys.readouterr().out
    full = tmp_path / "full"
    full.mkdir()
    _runner(full, "tau: 0.5", "model.features_dtype=float16").run()
    assert len(_entries(full / "c")) == 3  # weak view = the eval entry, + K = 2 strong views


def test_option_errors_are_named():
    with pytest.raises(RobenchError, match="unknown lp-clip views_mode 'disk'.*online, cached"):
        LPCLIP.from_declared({"train_on": "x", "views_mode": "disk"})
    with pytest.raises(RobenchError, match=r"subset=-5 of lp-clip must be >= 0"):
        LPCLIP.from_declared({"train_on": "x", "subset": -5})
    with pytest.raises(RobenchError, match="subset='all' of lp-clip must be an integer"):
        LPCLIP.from_declared({"train_on": "x", "subset": "all"})
    assert _opts().views_mode == "cached" and _opts().subset == 0  # the defaults


def test_a_bad_option_in_a_suite_exits_2_naming_it(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE.format(extra="views_mode: onlin"))
    r = subprocess.run([sys.executable, "-m", "robench.cli", "run", f"suite={tmp_path / 's.yaml'}",
                        f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown lp-clip views_mode 'onlin'. Did you mean 'online'" in r.stderr


def test_the_quickstart_lp_clip_cell_is_unchanged(tmp_path):
    """The default (cached) mode reproduces the committed quickstart record bit for bit."""
    import yaml

    from robench.models.backbone import kernel_family

    base = ROOT / "results" / "quickstart" / "tiny-clip-lp-clip" / "cifar10-subset-test.json"
    if json.loads(base.read_text())["provenance"]["kernels"] != kernel_family("cpu"):
        pytest.skip("bit-exact only within the kernel family that wrote the baseline")
    suite = yaml.safe_load((ROOT / "suites" / "quickstart.yaml").read_text())
    suite["models"] = [m for m in suite["models"]
                       if isinstance(m, dict) and m["name"] == "tiny-clip-lp-clip"]
    suite.update(datasets=["cifar10-subset-test"], id_dataset=None, progress=False)
    suite.pop("analysis")
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(suite))
    cfg = load_suite(str(tmp_path / "quickstart.yaml"),
                     [f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}",
                      "device=cpu"])
    Runner(cfg).run()
    assert same_outputs(tmp_path / "r" / "quickstart" / "tiny-clip-lp-clip" /
                        "cifar10-subset-test.json", base)
