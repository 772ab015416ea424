"""Temperature scaling (Guo et al. 2017), and the three heads end to end through the runner."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, replace

import numpy as np
import pytest

from robench.config import load_suite
from robench.data.base import ImageSource
from robench.errors import RobenchError
from robench.features import FeatureSet
from robench.methods import METHODS, make_method
from robench.methods.base import HeadContext, Method, Options, Settings, option
from robench.methods.temperature import TemperatureScaling
from robench.models import temperature as TS
from robench.models.heads import LinearHead
from robench.registry import ModelSpec
from robench.runner import Runner


def _softmax_sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits): a model calibrated by construction."""
    return (logits + rng.gumbel(size=logits.shape)).argmax(1)


def test_fitted_temperature_is_the_grid_optimum():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(800, 6)) * 2.0
    y = _softmax_sample(true_logits, rng)
    for factor in (10.0, 0.3):  # over- and under-confident versions of a calibrated model
        z = factor * true_logits
        t = TS.fit_temperature(z, y)
        grid = np.exp(np.linspace(np.log(0.01), np.log(100.0), 4001))
        nlls = np.array([TS.nll(z, y, g) for g in grid])
        best = grid[nlls.argmin()]
        step = np.log(grid[1] / grid[0])
        assert abs(np.log(t) - np.log(best)) <= step
        assert TS.nll(z, y, t) <= nlls.min() + 1e-9
        assert t == pytest.approx(factor, rel=0.15)  # it undoes the distortion


def test_temperature_is_clipped_when_the_data_are_separable():
    z = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert TS.fit_temperature(z, np.array([0, 1])) == TS.T_MIN


# -- build() on synthetic features, with a stand-in base method -----------------------------------
@dataclass(frozen=True)
class FakeOptions(Options):
    scale: float = option(1.0, "multiplies the fake head's over-confident scale")


class FakeBase(Method):
    """A base method whose head is a fixed classifier made 10x over-confident."""

    name = "fake"
    summary = "test stand-in"
    Options = FakeOptions
    weight: np.ndarray
    built: list[str] = []

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        self.built.append(source.name)
        return LinearHead(self.weight.astype(np.float32), 10.0 * self.options.scale,
                          ["a", "b", "c", "d"], bias=np.full(4, 0.5, dtype=np.float32),
                          info={"head": "fake"})


class FakeFineTune(Method):
    """A backbone-changing base: prepare() points the spec at a checkpoint."""

    name = "fake-ft"
    summary = "test stand-in"
    Options = FakeOptions
    trains_on_images = True

    def prepare(self, bench, name: str, spec: ModelSpec) -> ModelSpec:
        return replace(spec, arch="derived-arch", pretrained="/ckpt.pt")

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        raise AssertionError("not built in this test")


@dataclass
class FakeBench:
    feats: dict
    settings: Settings = Settings(cache_dir="", device="cpu", progress=False)

    def features(self, backbone, name: str):
        return self.feats[name]


@pytest.fixture()
def fakes(monkeypatch):
    module = types.ModuleType("fake_methods")
    module.FakeBase, module.FakeFineTune = FakeBase, FakeFineTune
    monkeypatch.setitem(sys.modules, "fake_methods", module)
    monkeypatch.setitem(METHODS, "fake", "fake_methods:FakeBase")
    monkeypatch.setitem(METHODS, "fake-ft", "fake_methods:FakeFineTune")


@pytest.fixture()
def overconfident(fakes, monkeypatch):
    """The fake base method plus val/test features labelled by its calibrated version."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 4))
    monkeypatch.setattr(FakeBase, "weight", w, raising=False)
    monkeypatch.setattr(FakeBase, "built", [])
    names = ["a", "b", "c", "d"]

    def split(name: str, n: int):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        y = _softmax_sample(x @ w, rng)
        return ImageSource(name, y, names, f"m-{name}", None), FeatureSet(x, [0], f"k-{name}", 1)

    spec = ModelSpec("x", method="temperature-scaling", options={
        "base": "fake", "base_options": {"scale": 1.0}, "calibrate_on": "val"})
    return HeadContext(None, spec, FakeBench({"val": split("val", 3000),
                                              "test": split("test", 3000)}))


def _ts(ctx: HeadContext) -> TemperatureScaling:
    return make_method("temperature-scaling", ctx.spec.options, "m")


def _nll_acc(head: LinearHead, split) -> tuple[float, float]:
    src, fs = split
    logits = head.logits(fs.features)
    return TS.nll(logits, src.labels), float((logits.argmax(1) == src.labels).mean())


def test_lowers_nll_of_an_overconfident_head_and_keeps_accuracy(overconfident):
    ctx = overconfident
    feats = ctx.bench.feats
    test_src = feats["test"][0]
    ts = _ts(ctx)
    assert isinstance(ts.base, FakeBase) and ts.base.options.scale == 1.0
    base = ts.base.build(ctx, test_src)
    head = ts.build(ctx, test_src)
    t = head.info["temperature"]
    assert t == pytest.approx(10.0, rel=0.1)
    assert head.scale == pytest.approx(base.scale / t)
    np.testing.assert_array_equal(head.weight, base.weight)
    x = feats["test"][1].features
    np.testing.assert_allclose(head.logits(x), base.logits(x) / t, rtol=1e-5, atol=1e-5)
    nll_base, acc_base = _nll_acc(base, feats["test"])
    nll_ts, acc_ts = _nll_acc(head, feats["test"])  # held-out: not the calibration split
    assert nll_ts < 0.5 * nll_base
    assert acc_ts == acc_base
    info = head.info
    assert info["base_method"] == "fake" and info["head"] == "fake"
    assert info["calibration_nll_after"] < info["calibration_nll_before"]


def test_sub_list_head_is_calibrated_with_the_full_head_of_the_val_split(overconfident,
                                                                         monkeypatch):
    """A base that builds only the scored columns (zero-shot for ImageNet-R): T is fitted with
    the base head built for the validation split's own classes -- the T a full head gets -- and
    the calibrated head keeps its columns and scores as the calibrated full head restricted."""
    from robench.scoring import cell_outputs

    ctx = overconfident
    full_build = FakeBase.build

    def sub_list_build(self, ctx, source):
        head = full_build(self, ctx, source)
        if source.class_subset is None:
            return head
        cols = list(source.class_subset)
        return LinearHead(head.weight[:, cols], head.scale, head.classnames,
                          bias=head.bias[cols], info=head.info, columns=cols)

    monkeypatch.setattr(FakeBase, "build", sub_list_build)
    test_src, test_fs = ctx.bench.feats["test"]
    keep = np.isin(test_src.labels, [0, 2])
    sub_src = ImageSource("test-sub", test_src.labels[keep], test_src.classnames, "m", None,
                          class_subset=[0, 2])
    feats = FeatureSet(test_fs.features[keep], [], "k", False)
    ts = _ts(ctx)
    full = ts.build(ctx, test_src)
    FakeBase.built.clear()
    sub = ts.build(ctx, sub_src)
    assert FakeBase.built == ["test-sub", "val"]  # the sub-list head cannot score val's 4
    assert sub.columns == [0, 2] and sub.weight.shape[1] == 2
    assert sub.info["temperature"] == full.info["temperature"]
    got, want = cell_outputs(sub, feats, sub_src), cell_outputs(full, feats, sub_src)
    for g, e in zip(got.samples, want.samples, strict=True):
        np.testing.assert_array_equal(g, e)


def test_refuses_mismatched_label_space_and_bad_options(overconfident):
    ctx = overconfident
    src, fs = ctx.bench.feats["val"]
    other = ImageSource("val", src.labels, ["w", "x", "y", "z"], "m", None)
    ctx.bench.feats["val"] = (other, fs)
    with pytest.raises(RobenchError, match="another label space"):
        _ts(ctx).build(ctx, ctx.bench.feats["test"][0])
    with pytest.raises(RobenchError, match="calibrate_on"):
        make_method("temperature-scaling", {"base": "zeroshot"})
    with pytest.raises(RobenchError, match="Did you mean 'linear-probe'"):
        make_method("temperature-scaling", {"base": "linear-prob", "calibrate_on": "v"})
    with pytest.raises(RobenchError, match="scale=.*must be a number.*base_options"):
        make_method("temperature-scaling", {"base": "fake", "base_options": {"scale": "x"},
                                            "calibrate_on": "v"})
    with pytest.raises(RobenchError, match="cannot wrap itself"):
        make_method("temperature-scaling", {"base": "temperature-scaling", "calibrate_on": "v"})


def test_prepare_delegates_to_a_backbone_changing_base(fakes):
    spec = ModelSpec("a", method="temperature-scaling", options={
        "base": "fake-ft", "base_options": {"scale": 2.0}, "calibrate_on": "v"})
    ts = make_method(spec.method, spec.options)
    ready = ts.prepare(None, "m", spec)
    assert (ready.arch, ready.pretrained) == ("derived-arch", "/ckpt.pt")
    assert ready.method == "temperature-scaling" and ready.options == spec.options
    base = ts.base_spec(ready)
    assert base.method == "fake-ft" and base.options == {"scale": 2.0}
    assert base.pretrained == "/ckpt.pt"
    # its training split is read as images: no features of it, only of the calibration split
    assert ts.feature_datasets() == ["v"]
    zs = replace(spec, options={"base": "zeroshot", "calibrate_on": "v"})
    assert make_method(zs.method, zs.options).prepare(None, "m", zs) == zs


# -- end to end: a suite with the three methods --------------------------------------------------
LP_OPTS = ("{train_on: cifar10-subset-probe, val_on: cifar10-subset-val, refit: train, "
           "grid: [1.0, 100.0]}")
SUITE = f"""
models:
  - tiny-random
  - {{name: lp, arch: robench-tiny-vit, method: linear-probe, options: {LP_OPTS}}}
  - {{name: lpc, arch: robench-tiny-vit, method: lp-clip,
      options: {{train_on: cifar10-subset-val, views: 1, epochs: 2, lr: 0.001}}}}
  - {{name: ts-lp, arch: robench-tiny-vit, method: temperature-scaling,
      options: {{base: linear-probe, base_options: {LP_OPTS},
                calibrate_on: cifar10-subset-val}}}}
  - {{name: ts-zs, arch: robench-tiny-vit, method: temperature-scaling,
      options: {{base: zeroshot, calibrate_on: cifar10-subset-val}}}}
datasets: [cifar10-subset-val]
model: {{num_workers: 0, batch_size: 500}}
metrics: {{bootstrap: 0}}
progress: false
"""


def test_suite_with_linear_probe_lp_clip_and_temperature_scaling(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    # evaluated on its own calibration / selection split on purpose (NLL there cannot rise)
    cfg = load_suite(str(tmp_path / "s.yaml"), ["allow_train_on_eval=true",
                                                f"cache_dir={tmp_path / 'c'}",
                                                f"results_dir={tmp_path / 'r'}", "device=cpu"])
    paths = Runner(cfg).run()
    assert len(paths) == 5 and all(p.is_file() for p in paths)
    out = tmp_path / "r" / "s"
    rec = {m: json.loads((out / m / "cifar10-subset-val.json").read_text())
           for m in ("tiny-random", "lp", "lpc", "ts-lp", "ts-zs")}
    methods = {m: r["protocol"]["method"] for m, r in rec.items()}
    assert methods == {"tiny-random": "zeroshot", "lp": "linear-probe", "lpc": "lp-clip",
                       "ts-lp": "temperature-scaling", "ts-zs": "temperature-scaling"}
    head = {m: r["method"]["head"] for m, r in rec.items()}
    assert head["lp"]["C"] in head["lp"]["grid"]
    assert head["ts-lp"]["base_method"] == "linear-probe"
    assert all("C" not in r["protocol"] and "temperature" not in r["protocol"]
               for r in rec.values())  # method knobs never land among the protocol fields
    for base, ts in (("lp", "ts-lp"), ("tiny-random", "ts-zs")):
        assert head[ts]["temperature"] > 0
        # same head up to T: identical accuracy, and on the calibration split itself (this
        # suite evaluates on it) NLL cannot be worse than at T = 1
        assert rec[ts]["metrics"]["acc1"] == rec[base]["metrics"]["acc1"]
        assert rec[ts]["metrics"]["nll"] <= rec[base]["metrics"]["nll"] + 1e-6
    assert rec["lp"]["metrics"]["acc1"] > rec["tiny-random"]["metrics"]["acc1"]
