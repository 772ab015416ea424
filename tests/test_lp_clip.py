"""LP-CLIP: label-free distillation + self-training on cached features."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import LabelFree, reachable, same_outputs, shipped_val, with_hidden_split

from robench.config import load_suite
from robench.data.folder import load as load_folder
from robench.errors import RobenchError
from robench.methods.base import HeadContext
from robench.methods.lp_clip import LPCLIPOptions
from robench.models import lp_clip as LPC
from robench.models.heads import LinearHead
from robench.registry import ASSETS
from robench.runner import Runner

SCALE = 14.3


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def clusters():
    """Class clusters on the sphere; zero-shot weights = noisy cluster means (an informative
    teacher, far from perfect); strong views = perturbed weak views."""
    rng = np.random.default_rng(0)
    n, d, c, k = 600, 16, 5, 2
    means = _normalize(rng.normal(size=(c, d)))
    y = rng.integers(0, c, n)
    weak = _normalize(means[y] + 0.8 * rng.normal(size=(n, d)) / np.sqrt(d) * 2)
    strong = np.stack([_normalize(weak + 0.1 * rng.normal(size=(n, d))) for _ in range(k)])
    w_zs = _normalize(means + 0.5 * rng.normal(size=(c, d))).T
    return (weak.astype(np.float16), strong.astype(np.float16), w_zs.astype(np.float32), y)


def test_lr0_from_zeroshot_reproduces_zeroshot_exactly(clusters):
    weak, strong, w_zs, _ = clusters
    cfg = LPC.LPCLIPConfig(lr=0.0, rounds=2, epochs=2, batch_size=64, ce_weight=1.0, tau=0.2)
    res = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=0)
    np.testing.assert_array_equal(res.weight, w_zs)
    student = LinearHead(res.weight, res.scale, list("abcde"), bias=res.bias)
    zeroshot = LinearHead(w_zs, SCALE, list("abcde"))
    np.testing.assert_array_equal(student.logits(weak), zeroshot.logits(weak))
    assert res.history[0]["confident"] > 0  # the CE term was active, and still nothing moved


def test_student_agreement_with_an_informative_teacher_rises(clusters):
    weak, strong, w_zs, y = clusters
    cfg = LPC.LPCLIPConfig(lr=0.05, rounds=1, epochs=5, batch_size=64, init="random")
    res = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=0)
    h = res.history[0]
    assert h["agreement_before"] < 0.5 < 0.9 < h["agreement_after"]
    assert h["loss"][-1] < h["loss"][0]
    # from the zero-shot init, with self-training: the student stays close to its teacher and
    # here (teacher = noisy cluster means) it even beats it on the hidden labels
    cfg = LPC.LPCLIPConfig(lr=0.01, rounds=2, epochs=5, batch_size=64, bias=True)
    res = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=0)
    assert [h["teacher"] for h in res.history] == ["zeroshot", "student 1"]
    assert res.history[0]["agreement_after"] > 0.7 and res.bias is not None
    student_acc = ((weak.astype(np.float32) @ res.weight + res.bias).argmax(1) == y).mean()
    zeroshot_acc = ((weak.astype(np.float32) @ w_zs).argmax(1) == y).mean()
    assert student_acc > zeroshot_acc


def test_seeded_reproducibility(clusters):
    weak, strong, w_zs, _ = clusters
    cfg = LPC.LPCLIPConfig(lr=0.02, rounds=2, epochs=2, batch_size=50, init="random")
    a = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=3)
    b = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=3)
    c = LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=4)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.history == b.history
    assert not np.array_equal(a.weight, c.weight)


def test_distillation_loss_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4) * 3, torch.randn(6, 4) * 3
    temp = 2.5
    loss, parts = LPC.distillation_loss(s, t, temp, tau=2.0, ce_weight=1.0)  # tau > 1: no CE
    pt = torch.softmax(t / temp, 1)
    kl = (pt * (pt.log() - torch.log_softmax(s / temp, 1))).sum(1).mean() * temp ** 2
    assert loss.item() == pytest.approx(kl.item(), rel=1e-5) and parts["confident"] == 0.0
    zero, _ = LPC.distillation_loss(t, t, temp, tau=2.0, ce_weight=0.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    conf = torch.softmax(t, 1).max(1).values
    tau = float(conf.median())
    full, parts = LPC.distillation_loss(s, t, temp, tau=tau, ce_weight=0.7)
    ce = torch.nn.functional.cross_entropy(s, t.argmax(1), reduction="none")
    expect = kl + 0.7 * (ce * (conf >= tau)).sum() / len(s)  # normalised by the batch size
    assert full.item() == pytest.approx(expect.item(), rel=1e-5)
    assert parts["confident"] == pytest.approx(float((conf >= tau).float().mean()))


def test_training_functions_take_no_labels():
    for fn in (LPC.self_train, LPC.train_student, LPC.distillation_loss,
               LPC.training_features):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"y", "labels", "label", "targets", "target"}, fn.__name__
    with pytest.raises(RobenchError, match="must not read the labels"):
        _ = LPC.Unlabelled(LabelFree(shipped_val())).labels


def test_the_label_firewall_has_no_route_back_to_labels_or_names():
    from robench.data.base import ImageSource
    from robench.features import describe

    src = shipped_val()
    train = LPC.Unlabelled(src)
    reached = reachable(train)
    assert not any(isinstance(o, ImageSource) for o in reached)  # no way back to the source
    assert not any(o is src.labels or o is src.info for o in reached)
    assert not any(isinstance(o, np.ndarray) and o.shape == src.labels.shape
                   and np.issubdtype(o.dtype, np.integer) for o in reached)
    assert not hasattr(train, "__dict__")  # nothing can be attached to it later
    assert "paths" not in train.info and describe(train, [0, 1]) == "#0, #1"  # no file names
    public = [getattr(train, a) for a in ("name", "classnames", "manifest_hash")]
    assert not any("/" in str(v) for v in public)
    assert np.array_equal(np.asarray(train.load_image(7)), np.asarray(src.load_image(7)))
    with pytest.raises(RobenchError, match="must not read the labels"):
        _ = train.labels


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One feature cache for this module's real-image tests: the runner test below reuses the
    weak and strong views extracted here (same backbone weights, images, augmentation knobs
    and seed), and must find them there."""
    return tmp_path_factory.mktemp("lpclip-cache")


def test_label_free_split_trains_on_real_images(tiny_backbone, feature_cache, tmp_path):
    train = LPC.Unlabelled(LabelFree(shipped_val()))
    opts = LPCLIPOptions(train_on="val", views=1)
    # seed 123 = the seed of both tiny_backbone and the runner below, so they share the cache
    weak, strong = LPC.training_features(tiny_backbone, train, str(feature_cache), opts, seed=123)
    assert len(strong) == 1 and strong[0].features.shape == weak.features.shape == (500, 32)
    assert strong[0].key != weak.key
    assert not np.array_equal(strong[0].features, weak.features)  # the views are augmented
    from robench.models.zeroshot import class_embeddings
    from robench.registry import template_set

    w_zs = class_embeddings(tiny_backbone, train.classnames, template_set("cifar"), tmp_path,
                            progress=False)
    cfg = LPC.LPCLIPConfig(lr=0.01, rounds=1, epochs=2, batch_size=128)
    res = LPC.self_train(weak.features, np.stack([strong[0].features]), w_zs,
                         tiny_backbone.logit_scale, cfg, seed=0)
    assert res.weight.shape == (32, 10) and np.isfinite(res.weight).all()
    assert not np.array_equal(res.weight, w_zs)
    with pytest.raises(TypeError, match="Unlabelled"):
        LPC.training_features(tiny_backbone, shipped_val(), str(tmp_path), opts, seed=0)


SUITE = """
models:
  - tiny-random
  - {name: lpc0, arch: robench-tiny-vit, method: lp-clip,
     options: {train_on: hidden, views: 1, epochs: 1, rounds: 2, lr: 0.0}}
  - {name: lpc, arch: robench-tiny-vit, method: lp-clip,
     options: {train_on: hidden, views: 1, epochs: 2, lr: 0.01, init: random}}
datasets: [cifar10-subset-val]
model: {num_workers: 0, batch_size: 250}
metrics: {bootstrap: 0}
progress: false
"""


def _runner(tmp_path, *extra, suite: str = SUITE, cache=None):
    (tmp_path / "s.yaml").write_text(suite)
    cfg = load_suite(str(tmp_path / "s.yaml"), [f"cache_dir={cache or tmp_path / 'c'}",
                                                f"results_dir={tmp_path / 'r'}", "device=cpu",
                                                "seed=123",
                                                # the label-free split IS the evaluated one,
                                                # under another name, on purpose
                                                "allow_train_on_eval=true", *extra])
    return with_hidden_split(Runner(cfg))


def test_runner_trains_without_labels_and_reuses_the_artifact(tmp_path, feature_cache,
                                                             monkeypatch):
    _runner(tmp_path, cache=feature_cache).run()
    assert len(list(feature_cache.glob("features/*.npy"))) == 2  # weak + 1 strong view, shared
    out = tmp_path / "r" / "s"
    recs = {m: json.loads((out / m / "cifar10-subset-val.json").read_text())
            for m in ("tiny-random", "lpc0", "lpc")}
    assert recs["lpc"]["protocol"]["method"] == "lp-clip"
    assert recs["lpc"]["method"]["head"]["train_on"] == "hidden"
    assert recs["lpc"]["method"]["head"]["logit_scale"] == pytest.approx(recs["tiny-random"][
        "provenance"]["logit_scale"])

    def cell(m):
        return out / m / "cifar10-subset-val.json"

    assert same_outputs(cell("lpc0"), cell("tiny-random"))  # lr 0 = zero-shot
    assert not same_outputs(cell("lpc"), cell("tiny-random"))

    def boom(*a, **k):
        raise AssertionError("retrained although nothing changed")

    monkeypatch.setattr(LPC, "self_train", boom)
    _runner(tmp_path, "force=true", cache=feature_cache).run()  # heads from cached artifacts
    assert same_outputs(cell("lpc0"), cell("tiny-random"))
    with pytest.raises(AssertionError, match="retrained"):  # another option: retrains
        _runner(tmp_path, "force=true", cache=feature_cache,
                suite=SUITE.replace("epochs: 2", "epochs: 3")).run()


def test_evaluating_on_another_label_space_is_refused(tmp_path):
    runner = _runner(tmp_path)
    other = load_folder(ASSETS / "cifar10-subset" / "val", name="x")
    other.classnames = [c.upper() for c in other.classnames]
    ctx = HeadContext(None, runner.models["lpc"], runner)
    with pytest.raises(RobenchError, match="trained on another label space"):
        runner.method_of("lpc").build(ctx, other)


def test_the_teacher_is_computed_per_step_never_as_an_n_by_c_matrix(clusters, monkeypatch):
    """Self-training asks its teacher (and the student, for the agreement statistics) for at
    most a block of rows at a time; the logits are those of the whole-set product, and a round
    trained against a precomputed (N, C) teacher ends at the same weights."""
    weak, strong, w_zs, _ = clusters
    weak_t = torch.tensor(weak, dtype=torch.float32)
    teacher = LPC.Teacher(weak_t, torch.tensor(w_zs), None, SCALE)
    full = SCALE * (weak_t @ torch.tensor(w_zs))
    rows = torch.tensor([3, 0, 599, 17])
    torch.testing.assert_close(teacher[rows], full[rows], rtol=0, atol=1e-5)
    monkeypatch.setattr(LPC.Teacher, "BLOCK", 64)
    assert torch.equal(teacher.labels(), full.argmax(1))

    asked: list[int] = []
    real = LPC.Teacher.__getitem__

    def spy(self, idx):
        out = real(self, idx)
        asked.append(len(out))
        return out

    monkeypatch.setattr(LPC.Teacher, "__getitem__", spy)
    cfg = LPC.LPCLIPConfig(lr=0.01, rounds=2, epochs=2, batch_size=32, bias=True)
    LPC.self_train(weak, strong, w_zs, SCALE, cfg, seed=0)
    assert asked and max(asked) <= 64 < len(weak)  # blocks of 64 rows, steps of 32 pairs

    class Held(LPC.Teacher):  # the teacher as it was before: slices of one (N, C) matrix
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

        def __len__(self) -> int:
            return len(self.logits)

        def __getitem__(self, idx):
            return self.logits[idx]

    views = LPC.CachedViews(torch.tensor(strong))
    w0 = torch.tensor(w_zs)
    streamed = LPC.train_student(views, teacher, w0, SCALE, cfg, seed=5, weak=weak_t)
    held = LPC.train_student(views, Held(full), w0, SCALE, cfg, seed=5, weak=weak_t)
    torch.testing.assert_close(streamed[0], held[0], rtol=0, atol=1e-4)
    assert streamed[2]["agreement_after"] == pytest.approx(held[2]["agreement_after"], abs=0.01)
