"""Linear probe: the invariants that catch a wrong implementation (objective, selection, cache)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from robench.data.base import ImageSource
from robench.errors import RobenchError
from robench.features import FeatureSet
from robench.methods import make_method
from robench.methods.base import Settings
from robench.models import linear_probe as LP
from robench.models.heads import LinearHead
from robench.registry import ModelSpec


def planted(n: int, rng: np.random.Generator, w: np.ndarray, b: np.ndarray,
            noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features labelled by a known linear rule (plus optional Gumbel noise)."""
    x = rng.normal(size=(n, w.shape[0]))
    return x, (x @ w + b + noise * rng.gumbel(size=(n, w.shape[1]))).argmax(1)


def test_recovers_a_planted_linear_separator():
    rng = np.random.default_rng(0)
    w_true, b_true = rng.normal(size=(10, 4)), 0.3 * rng.normal(size=4)
    x, y = planted(2000, rng, w_true, b_true)
    x_test, y_test = planted(2000, rng, w_true, b_true)
    fit = LP.fit_logistic(x, y, 4, C=100.0)
    acc, _ = LP.evaluate(fit, x_test, y_test)
    assert acc > 98.5
    # softmax is invariant to adding one vector to every class column: compare centred columns
    a = fit.weight - fit.weight.mean(1, keepdims=True)
    t = w_true - w_true.mean(1, keepdims=True)
    assert (a * t).sum() / (np.linalg.norm(a) * np.linalg.norm(t)) > 0.99
    assert abs(fit.bias.sum()) < 1e-9  # centred bias


@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
def test_equals_sklearn_multinomial_logistic_regression(C):
    rng = np.random.default_rng(1)
    w_true = 4 * rng.normal(size=(12, 5))
    x, y = planted(300, rng, w_true, np.zeros(5), noise=1.0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True) + 0.5  # normalised + a shared offset, as CLIP
    fit = LP.fit_logistic(x, y, 5, C, tol=1e-10)
    sk = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x, y)
    logits = x @ fit.weight + fit.bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, sk.predict_proba(x), atol=2e-6)
    np.testing.assert_allclose(fit.weight, sk.coef_.T, atol=5e-5)
    np.testing.assert_allclose(fit.bias, sk.intercept_ - sk.intercept_.mean(), atol=5e-5)
    # the objective it reports is sklearn's 0.5||W||^2 + C sum CE, divided by C n
    ce = -np.log(sk.predict_proba(x)[np.arange(len(y)), y]).sum()
    assert fit.objective == pytest.approx((0.5 * (sk.coef_ ** 2).sum() + C * ce) / (C * len(y)),
                                          rel=1e-7)


def test_chunked_gradient_and_warm_start_reach_the_same_optimum():
    rng = np.random.default_rng(2)
    x, y = planted(500, rng, rng.normal(size=(8, 3)), np.zeros(3), noise=0.5)
    ref = LP.fit_logistic(x, y, 3, 10.0, tol=1e-10)
    chunked = LP.fit_logistic(x, y, 3, 10.0, tol=1e-10, chunk=64)
    warm = LP.fit_logistic(x, y, 3, 10.0, tol=1e-10, init=LP.fit_logistic(x, y, 3, 0.1))
    for other in (chunked, warm):
        np.testing.assert_allclose(other.weight, ref.weight, atol=1e-6)
        np.testing.assert_allclose(other.bias, ref.bias, atol=1e-6)


def test_sweep_picks_the_best_validation_accuracy_then_refits():
    rng = np.random.default_rng(3)
    w_true = rng.normal(size=(20, 4))
    x, y = planted(60, rng, w_true, np.zeros(4), noise=2.0)  # few noisy rows: C matters
    xv, yv = planted(400, rng, w_true, np.zeros(4), noise=2.0)
    grid = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    res = LP.train_probe(x, y, xv, yv, 4, grid, refit="train", tol=1e-9)
    # recomputed independently, one C at a time, from a cold start
    accs = [LP.evaluate(LP.fit_logistic(x, y, 4, c, tol=1e-9), xv, yv)[0] for c in grid]
    np.testing.assert_allclose(res.val_acc, accs, atol=1e-9)
    assert len(set(accs)) > 1  # the sweep had something to choose
    assert res.val_acc[res.best_index] == max(accs)
    assert res.fit.C == grid[res.best_index]
    ref = LP.fit_logistic(x, y, 4, res.fit.C, tol=1e-9)
    np.testing.assert_allclose(res.fit.weight, ref.weight, atol=1e-5)
    both = LP.train_probe(x, y, xv, yv, 4, grid, refit="train+val", tol=1e-9)
    ref2 = LP.fit_logistic(np.concatenate([x, xv]), np.concatenate([y, yv]), 4, both.fit.C,
                           tol=1e-9)
    assert both.fit.C == res.fit.C
    np.testing.assert_allclose(both.fit.weight, ref2.weight, atol=1e-5)


def test_selection_rule_accuracy_then_nll_then_smaller_c(monkeypatch):
    rng = np.random.default_rng(4)
    x, y = planted(50, rng, rng.normal(size=(4, 3)), np.zeros(3))
    scores = {0.1: (80.0, 0.9), 1.0: (90.0, 0.5), 10.0: (90.0, 0.4), 100.0: (90.0, 0.4),
              1000.0: (85.0, 0.1)}
    monkeypatch.setattr(LP, "evaluate", lambda fit, xv, yv, **kw: scores[fit.C])
    res = LP.train_probe(x, y, x, y, 3, list(scores)[::-1], refit="train")  # order-free
    assert res.grid == sorted(scores) and res.fit.C == 10.0


# -- runner integration, on synthetic cached features -------------------------------------------
@dataclass
class FakeCtx:
    """The parts of robench.methods.base.HeadContext the probe uses."""

    feats: dict[str, tuple[ImageSource, FeatureSet]]
    options: dict
    cache_dir: str
    seed: int = 0
    backbone: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        weights_hash="w0", id=lambda: "bb0", device="cpu"))
    progress: bool = False

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("robench-tiny-vit", method="linear-probe", options=self.options)

    @property
    def settings(self) -> Settings:
        return Settings(cache_dir=self.cache_dir, device="cpu", seed=self.seed)

    def features(self, name: str) -> tuple[ImageSource, FeatureSet]:
        return self.feats[name]


def _build(ctx: FakeCtx, source: ImageSource) -> LinearHead:
    """The linear-probe method's head, its options parsed as a suite's are."""
    return make_method("linear-probe", ctx.options, "probe").build(ctx, source)


def _split(name: str, x: np.ndarray, y: np.ndarray, classnames: list[str],
           key: str | None = None, bad: list[int] | None = None) -> tuple[ImageSource, FeatureSet]:
    src = ImageSource(name, y, classnames, manifest_hash=f"m-{name}", loader=None)
    xf = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    return src, FeatureSet(xf, bad or [], key or f"k-{name}", cached=True)


@pytest.fixture()
def data():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, 3))
    names = ["a", "b", "c"]
    return {"tr": _split("tr", *planted(200, rng, w, np.zeros(3), 0.3), names, bad=[0, 5]),
            "va": _split("va", *planted(100, rng, w, np.zeros(3), 0.3), names)}


def test_build_caches_the_head_and_retrains_when_anything_changes(data, tmp_path, monkeypatch):
    calls = []
    real = LP.train_probe

    def counting(x_tr, *args, **kw):
        calls.append(len(x_tr))
        return real(x_tr, *args, **kw)

    monkeypatch.setattr(LP, "train_probe", counting)
    opts = {"train_on": "tr", "val_on": "va", "grid": [0.1, 10.0]}
    ctx = FakeCtx(data, opts, str(tmp_path))
    head = _build(ctx, data["va"][0])
    assert calls == [198]  # the two undecodable rows are excluded
    assert head.scale == 1.0 and head.bias is not None and head.weight.shape == (8, 3)
    assert head.classnames == ["a", "b", "c"] and head.info["C"] in (0.1, 10.0)
    assert head.info["refit"] == "train+val"

    def boom(*a, **k):
        raise AssertionError("retrained although nothing changed")

    monkeypatch.setattr(LP, "train_probe", boom)
    again = _build(FakeCtx(data, dict(opts), str(tmp_path)), data["va"][0])
    np.testing.assert_array_equal(again.weight, head.weight)
    np.testing.assert_array_equal(again.bias, head.bias)

    monkeypatch.setattr(LP, "train_probe", counting)
    _build(FakeCtx(data, opts, str(tmp_path), seed=1), data["va"][0])  # seed
    _build(FakeCtx(data, {**opts, "max_iter": 50}, str(tmp_path)), data["va"][0])  # options
    changed = dict(data)
    src, fs = data["tr"]
    changed["tr"] = (src, FeatureSet(fs.features, fs.bad, "another-key", True))  # train data
    _build(FakeCtx(changed, opts, str(tmp_path)), data["va"][0])
    changed["tr"] = data["tr"]
    changed["va"] = (data["va"][0], FeatureSet(data["va"][1].features, [], "val-2", True))
    _build(FakeCtx(changed, opts, str(tmp_path)), data["va"][0])  # val data
    _build(FakeCtx(data, opts, str(tmp_path), backbone=SimpleNamespace(  # weights
        weights_hash="w1", id=lambda: "bb1", device="cpu")), data["va"][0])
    assert len(calls) == 6


def test_build_refuses_another_label_space_and_bad_options(data, tmp_path):
    ctx = FakeCtx(data, {"train_on": "tr", "val_on": "va"}, str(tmp_path))
    other = ImageSource("other", np.zeros(3, dtype=np.int64), ["x", "y", "z"], "m", None)
    with pytest.raises(RobenchError, match="trained on another label space"):
        _build(ctx, other)
    with pytest.raises(RobenchError, match="val_on"):
        _build(FakeCtx(data, {"train_on": "tr"}, str(tmp_path)), data["va"][0])
    with pytest.raises(RobenchError, match="Did you mean 'grid'"):
        _build(FakeCtx(data, {"train_on": "tr", "val_on": "va", "grd": [1]}, str(tmp_path)),
                 data["va"][0])
    with pytest.raises(RobenchError, match="refit"):
        _build(FakeCtx(data, {"train_on": "tr", "val_on": "va", "refit": "val"},
                         str(tmp_path)), data["va"][0])


def test_head_artifact_holds_the_fit(data, tmp_path):
    head = _build(FakeCtx(data, {"train_on": "tr", "val_on": "va", "refit": "train",
                                   "grid": [3.0]}, str(tmp_path)), data["va"][0])
    x, y = data["tr"][1].features.astype(np.float64), data["tr"][0].labels
    keep = np.setdiff1d(np.arange(len(y)), [0, 5])
    ref = LP.fit_logistic(x[keep], y[keep], 3, 3.0)
    np.testing.assert_allclose(head.weight, ref.weight, atol=1e-4)  # stored as float32
    assert Path(head.info["artifact"], "summary.json").is_file()


# -- the solver at scale: streamed float32 blocks agree with the float64 in-memory solve --------
def clip_like(n: int, rng: np.random.Generator, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float16 features sharing one large direction (as CLIP's do), noisy labels."""
    d = w.shape[0]
    x = rng.normal(size=(n, d))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) + 0.5 / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), (3 * x @ w + rng.gumbel(size=(n, w.shape[1]))).argmax(1)


def cache_file(path: Path, x: np.ndarray) -> np.memmap:
    """``x`` as a feature cache entry: an .npy file opened memory-mapped, as the runner does."""
    np.save(path, x)
    return np.load(path, mmap_mode="r")


def test_streamed_float32_sweep_agrees_with_the_float64_solver(tmp_path, monkeypatch):
    """Same selected C, validation accuracy within 2 of 1,000 rows at every C, held-out
    predictions equal except on near-ties, weights within 0.2% (relative Frobenius).

    Why these tolerances: both solves stop when the largest gradient entry is below tol = 1e-6
    (float32 also when the objective stops changing at ~1e-8, its resolution of a mean CE), so
    each lies within ~||H^-1|| tol of the optimum; with weak regularisation (C >= 1e3) H's
    smallest eigenvalue is ~1/(C n) and the flat directions of W move by ~1e-3 relative
    (measured 6e-4..8e-4, and 1e-7..1e-4 for C <= 100), i.e. logits by ~1e-2: rows whose
    top-2 margin is below that can flip. The float64 solve itself matches scikit-learn to 5e-5.
    """
    rng = np.random.default_rng(7)
    w = 3 * rng.normal(size=(32, 10))
    (xt, yt), (xv, yv), (xe, _) = (clip_like(n, rng, w) for n in (3000, 1000, 5000))
    reads = []
    real = LP.iter_row_blocks

    def spy(features, block, rows=None):
        for pos, xb in real(features, block, rows):
            reads.append(len(xb))
            yield pos, xb

    monkeypatch.setattr(LP, "iter_row_blocks", spy)
    ref = LP.train_probe(xt.astype(np.float64), yt, xv.astype(np.float64), yv, 10,
                         precision="float64")
    assert reads == [] and ref.extra["precision"] == "float64"
    new = LP.train_probe(LP.FeatureRows(cache_file(tmp_path / "t.npy", xt)), yt,
                         LP.FeatureRows(cache_file(tmp_path / "v.npy", xv)), yv, 10,
                         precision="float32", resident_bytes=0)
    assert new.extra == {"precision": "float32", "resident": False, "block": new.extra["block"]}
    # streamed: every L-BFGS evaluation re-read the train file from the cache, block by block
    assert len(reads) > 100 and max(reads) <= new.extra["block"]
    assert new.fit.C == ref.fit.C and new.best_index == ref.best_index
    np.testing.assert_allclose(new.val_acc, ref.val_acc, atol=0.2)
    a, b = ref.fit, new.fit
    assert np.linalg.norm(a.weight - b.weight) / np.linalg.norm(a.weight) < 2e-3
    xe = xe.astype(np.float64)
    la, lb = xe @ a.weight + a.bias, xe @ b.weight + b.bias
    assert np.abs(la - lb).max() < 0.05  # logits are O(10) here
    top2 = np.sort(la, axis=1)[:, -2:]
    flipped = la.argmax(1) != lb.argmax(1)
    assert flipped.mean() <= 1e-3 and (top2[flipped, 1] - top2[flipped, 0] < 0.05).all()


def test_feature_rows_keep_mask_and_chaining_equal_the_materialised_rows(tmp_path):
    rng = np.random.default_rng(8)
    x1 = rng.normal(size=(50, 6)).astype(np.float16)
    x2 = rng.normal(size=(30, 6)).astype(np.float16)
    keep = rng.random(50) > 0.3
    rows = LP.FeatureRows(cache_file(tmp_path / "a.npy", x1), keep) + LP.FeatureRows(x2)
    assert len(rows) == keep.sum() + 30 and rows.dim == 6
    got = np.concatenate(list(rows.blocks(7)))
    np.testing.assert_array_equal(got, np.concatenate([x1[keep], x2]).astype(np.float32))
    assert max(len(b) for b in rows.blocks(7)) <= 7
    with pytest.raises(ValueError, match="chain"):
        rows + LP.FeatureRows(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="keep mask"):
        LP.FeatureRows(x1, keep[:10])
    # a fit on masked, chained, streamed rows is the fit on the rows they stand for
    y = rng.integers(0, 3, len(rows))
    streamed = LP.fit_logistic(rows, y, 3, 1.0, tol=1e-10, chunk=16, resident_bytes=0)
    direct = LP.fit_logistic(got.astype(np.float64), y, 3, 1.0, tol=1e-10)
    np.testing.assert_allclose(streamed.weight, direct.weight, atol=1e-8)
    with pytest.raises(ValueError, match="labels for"):
        LP.fit_logistic(rows, y[:-1], 3, 1.0)


def test_plan_picks_precision_and_residency_by_size():
    small = LP.plan(50_000, 512, 10)  # CIFAR-10: exact and in memory
    assert small.dtype == torch.float64 and small.resident
    imagenet = LP.plan(1_281_167, 1024, 1000)  # on a CPU: float32, re-read from the cache
    assert imagenet.dtype == torch.float32 and not imagenet.resident
    assert imagenet.block * 1000 * 4 <= LP.BLOCK_BYTES
    on_gpu = LP.plan(1_281_167, 1024, 1000, resident_bytes=8 * 2**30)  # 5.2 GB of rows fit
    assert on_gpu.resident and on_gpu.dtype == torch.float32
    assert LP.plan(50_000, 512, 10, precision="float32").dtype == torch.float32
    assert LP.plan(1_281_167, 1024, 1000, precision="float64").dtype == torch.float64
    with pytest.raises(RobenchError, match="precision"):
        LP.plan(10, 2, 2, precision="float16")


def test_build_streams_cached_features_and_records_the_plan(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.normal(size=(8, 3))
    names = ["a", "b", "c"]
    splits = {}
    for name, n, bad in (("tr", 300, [3]), ("va", 120, [])):
        x, y = clip_like(n, rng, w)
        src = ImageSource(name, y, names, manifest_hash=f"m-{name}", loader=None)
        splits[name] = (src, FeatureSet(cache_file(tmp_path / f"{name}.npy", x), bad,
                                        f"k-{name}", cached=True))
    opts = {"train_on": "tr", "val_on": "va", "grid": [1.0, 100.0], "precision": "float32"}
    head = _build(FakeCtx(splits, opts, str(tmp_path / "cache")), splits["va"][0])
    summary = json.loads(Path(head.info["artifact"], "summary.json").read_text())
    assert summary["precision"] == "float32" and summary["n_train"] == 299 + 120
    exact = _build(FakeCtx(splits, {**opts, "precision": "auto"}, str(tmp_path / "cache")),
                     splits["va"][0])
    assert exact.info["artifact"] != head.info["artifact"]  # precision is part of the key
    assert np.abs(exact.weight - head.weight).max() < 1e-2 * np.abs(exact.weight).max()
    with pytest.raises(RobenchError, match="Did you mean 'float32'"):
        _build(FakeCtx(splits, {**opts, "precision": "floa32"}, str(tmp_path)),
                 splits["va"][0])
