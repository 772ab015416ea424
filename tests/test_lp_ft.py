"""LP-FT: the invariants that define it (Kumar et al. 2022) -- zero steps is the linear probe,
exactly; fine-tuning moves the encoder from the probe's head; the probe stage is the linear-probe
artifact, fitted once; WiSE-FT mixes its head as a linear layer; named errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cifar_cell, derived_state, run_cifar_suite, same_outputs, write_cifar10

from robench.data.base import ImageSource
from robench.errors import RobenchError
from robench.io import load_npz
from robench.methods import make_method
from robench.models import finetune as FT
from robench.models import linear_probe as LP
from robench.models import lp_ft as LPFT

PROBE = "train_on: cifar10-train, val_on: cifar10-train, grid: [1.0, 100.0]"
FT_OPTS = "epochs: 2, batch_size: 16, warmup: 2, workers: 0"
SUITE = f"""
models:
  - tiny-random
  - {{name: lp, arch: robench-tiny-vit, method: linear-probe, options: {{{PROBE}}}}}
  - {{name: lpft-lr0, arch: robench-tiny-vit, method: lp-ft,
      options: {{{PROBE}, {FT_OPTS}, lr: 0}}}}
  - {{name: lpft-ep0, arch: robench-tiny-vit, method: lp-ft,
      options: {{{PROBE}, epochs: 0, workers: 0}}}}
  - {{name: lpft, arch: robench-tiny-vit, method: lp-ft,
      options: {{{PROBE}, {FT_OPTS}, lr: 1.0e-3}}}}
  - {{name: wise, arch: robench-tiny-vit, method: wise-ft,
      options: {{finetuned: lpft, alphas: [0, 0.5, 1]}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 64}}
metrics: {{bootstrap: 0}}
progress: false
"""


def keys(kind: Path) -> list[Path]:
    """The artifact folders of one kind (not the hidden lock files beside them)."""
    return [p for p in kind.iterdir() if p.is_dir()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The suite, run in-process, counting the probe fits (every probe option is shared)."""
    tmp = tmp_path_factory.mktemp("lpft")
    fits = []
    real = LP.train_probe

    def counted(*args, **kwargs):
        fits.append(args[0].dim)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LP, "train_probe", counted)
        runner, out = run_cifar_suite(tmp, SUITE)
    return runner, out, tmp, fits


def _state(runner, model: str) -> dict[str, torch.Tensor]:
    return derived_state(runner.prepared(model).pretrained)


def _base_state() -> dict[str, torch.Tensor]:
    return FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0).model.state_dict()


def test_at_zero_steps_lp_ft_is_the_linear_probe_exactly(run):
    runner, out, tmp, _ = run
    (probe_dir,) = keys(tmp / "c" / "artifacts" / "linear-probe")
    probe = load_npz(probe_dir / "head.npz")
    base = _base_state()
    for model in ("lpft-lr0", "lpft-ep0"):
        # the encoder is the pre-trained one bit for bit, the head the probe's arrays ...
        state = _state(runner, model)
        assert all(torch.equal(state[k], base[k]) for k in base)
        head = FT.read_head(runner.prepared(model).pretrained)
        assert np.array_equal(head.weight, probe["weight"])
        assert np.array_equal(head.bias, probe["bias"]) and head.scale == 1.0
        # ... so every logit of the cell is the linear probe's, exactly (not to rounding)
        assert same_outputs(cifar_cell(out, model), cifar_cell(out, "lp"))


def test_fine_tuning_moves_the_encoder_and_head_from_the_probe_text_tower_frozen(run):
    runner, out, tmp, _ = run
    base, state = _base_state(), _state(runner, "lpft")
    visual = [k for k in base if k.startswith("visual.")]
    assert sum(not torch.equal(state[k], base[k]) for k in visual) > len(visual) // 2
    assert all(torch.equal(state[k], base[k]) for k in base if not k.startswith("visual."))
    head, zero = (FT.read_head(runner.prepared(m).pretrained) for m in ("lpft", "lpft-lr0"))
    assert not np.array_equal(head.weight, zero.weight)
    assert not np.array_equal(head.bias, zero.bias)  # the bias is trained with the head
    assert head.scale == 1.0  # at the probe's scale, not the logit scale
    assert not same_outputs(cifar_cell(out, "lpft"), cifar_cell(out, "lp"))


def test_the_probe_stage_is_the_linear_probe_artifact_fitted_once(run):
    runner, _, tmp, fits = run
    assert len(fits) == 1  # one linear-probe model and three lp-ft models, one fit
    assert len(keys(tmp / "c" / "artifacts" / "linear-probe")) == 1
    assert len(keys(tmp / "c" / "artifacts" / "lp-ft")) == 3


def test_wise_ft_of_lp_ft_mixes_the_heads_as_linear_layers(run):
    runner, out, _, _ = run
    assert same_outputs(cifar_cell(out, "wise-a0"), cifar_cell(out, "tiny-random"))
    assert same_outputs(cifar_cell(out, "wise-a1"), cifar_cell(out, "lpft"))
    ft = FT.read_head(runner.prepared("lpft").pretrained)
    mid = FT.read_head(runner.prepared("wise-a0.5").pretrained)
    zs = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0)
    w_zs = FT.class_embeddings(zs, ft.classnames, runner.templates_for("cifar10-train"),
                               runner.cfg.cache_dir, progress=False)
    # zero-shot layer s W_zs (no bias), LP-FT layer 1 * (W, b): their average, at scale 1
    np.testing.assert_allclose(mid.weight, 0.5 * zs.logit_scale * w_zs + 0.5 * ft.weight,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mid.bias, 0.5 * ft.bias, rtol=1e-6, atol=1e-7)
    assert mid.scale == 1.0


def test_a_head_with_a_bias_scores_like_the_evaluation_head():
    torch.manual_seed(0)
    f, w, b = torch.randn(6, 8), torch.randn(8, 3), torch.randn(3)
    visual = torch.nn.Identity()
    feats, logits = FT._Tuned(visual, w.clone(), 1.0, b.clone())(f)
    from robench.models.heads import LinearHead

    ref = LinearHead(weight=w.numpy(), scale=1.0, classnames=list("abc"), bias=b.numpy())
    np.testing.assert_allclose(logits.detach().numpy(),
                               ref.logits(F.normalize(f, dim=-1).numpy()), rtol=1e-6, atol=1e-6)
    # without a bias: the expression plain fine-tuning has always computed, bit for bit
    _, plain = FT._Tuned(visual, w.clone(), 11.5)(f)
    assert torch.equal(plain, 11.5 * F.normalize(f, dim=-1) @ w)


def _resume_case(tmp_path, **extra):
    """LP-FT's loop (a head with a bias) on 40 CIFAR images: (source, options, head, a fresh
    backbone factory, the uninterrupted result)."""
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=8), name="c",
                     options=cifar.CifarOptions(train=True))
    opts = make_method("lp-ft", {"train_on": "c", "val_on": "c", "epochs": 2, "lr": 1e-3,
                                 "batch_size": 16, "warmup": 1, "workers": 0, **extra}).options
    rng = np.random.default_rng(0)

    def fresh():
        return FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=5)

    d = fresh().model.visual.output_dim
    init = FT.HeadInit(rng.normal(size=(d, 10)).astype(np.float32),
                       rng.normal(size=10).astype(np.float32), 1.0)
    ref = FT.finetune(fresh(), src, [], opts, tmp_path / "ref", tmp_path / "cache",
                      progress=False, init=init)
    return src, opts, init, fresh, ref


def test_interrupted_lp_ft_resumes_to_the_same_weights_head_and_bias(tmp_path):
    src, opts, init, fresh, ref = _resume_case(tmp_path, checkpoint_every=1)
    real, calls = src.loader, {"n": 0}

    def dying(i):  # killed in the 2nd step of the 2nd epoch (3 steps of 16 per epoch of 40)
        calls["n"] += 1
        if calls["n"] > len(src) + 16 + 5:
            raise KeyboardInterrupt
        return real(i)

    src.loader = dying
    with pytest.raises(KeyboardInterrupt):
        FT.finetune(fresh(), src, [], opts, tmp_path / "int", tmp_path / "cache",
                    progress=False, init=init)
    state = torch.load(tmp_path / "int" / FT.CHECKPOINT, weights_only=True)
    assert state["step"] == 4 and "bias" in state
    src.loader = real
    out = FT.finetune(fresh(), src, [], opts, tmp_path / "int", tmp_path / "cache",
                      progress=False, init=init)
    a, b = derived_state(ref), derived_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = FT.read_head(ref), FT.read_head(out)
    assert np.array_equal(ha.weight, hb.weight) and np.array_equal(ha.bias, hb.bias)
    assert not np.array_equal(ha.bias, init.bias)


@pytest.mark.parametrize("given,match", [
    ({"train_on": "a"}, "val_on"),
    ({"train_on": "a", "val_on": "b", "lam": 1.0}, "lp-ft option"),
    ({"train_on": "a", "val_on": "b", "refit": "val"}, "refit"),
    ({"train_on": "a", "val_on": "b", "lr": -1.0}, "lr"),
    ({"train_on": "a", "val_on": "b", "grid": [0.0, "x"]}, "grid"),
])
def test_bad_options_are_named_errors(given, match):
    with pytest.raises(RobenchError, match=match):
        make_method("lp-ft", given, "m")


def _source(name: str, classes: list[str]) -> ImageSource:
    return ImageSource(name, np.zeros(2, dtype=np.int64), classes, "h", loader=None)


def test_a_validation_split_of_another_label_space_is_refused(tiny_backbone):
    sources = {"tr": _source("tr", ["a", "b"]), "va": _source("va", ["a", "c"])}
    bench = SimpleNamespace(source=sources.__getitem__)
    opts = make_method("lp-ft", {"train_on": "tr", "val_on": "va"}).options
    with pytest.raises(RobenchError, match="different label spaces"):
        LPFT.probe_stage(bench, None, tiny_backbone, opts)


def test_an_lp_ft_head_scores_only_its_label_space(tmp_path, tiny_backbone):
    FT.save_head(tmp_path, np.ones((4, 2), np.float32), ["a", "b"], bias=np.zeros(2), scale=1.0)
    spec = SimpleNamespace(pretrained=f"local-dir:{tmp_path}", method="lp-ft")
    ctx = SimpleNamespace(spec=spec, backbone=tiny_backbone)
    head = FT.finetuned_head(ctx, _source("x", ["a", "b"]))
    assert head.scale == 1.0 and np.array_equal(head.bias, np.zeros(2))
    with pytest.raises(RobenchError, match="another label space"):
        FT.finetuned_head(ctx, _source("y", ["a", "b", "c"]))


def test_an_initial_head_of_the_wrong_shape_is_refused(tmp_path):
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=2), name="c",
                     options=cifar.CifarOptions(train=True))
    opts = make_method("lp-ft", {"train_on": "c", "val_on": "c", "workers": 0}).options
    base = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0)
    bad = FT.HeadInit(np.zeros((3, 10), np.float32), None, 1.0)
    with pytest.raises(RobenchError, match="initial head"):
        FT.finetune(base, src, [], opts, Path(tmp_path / "o"), tmp_path, init=bad)


def test_grad_clip_0_means_no_clipping(tmp_path):
    """A max norm of 0 would scale every gradient to 0 (no learning); 0 turns clipping off."""
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=4), name="c",
                     options=cifar.CifarOptions(train=True))
    opts = make_method("lp-ft", {"train_on": "c", "val_on": "c", "epochs": 1, "lr": 1e-3,
                                 "batch_size": 10, "warmup": 1, "workers": 0,
                                 "grad_clip": 0.0, "weight_decay": 0.0}).options
    base = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0)
    before = {k: v.clone() for k, v in base.model.visual.state_dict().items()}
    init = FT.HeadInit(np.eye(base.model.visual.output_dim, 10, dtype=np.float32), None, 1.0)
    state = derived_state(FT.finetune(base, src, [], opts, tmp_path / "o", tmp_path,
                                      progress=False, init=init))
    assert any(not torch.equal(state[f"visual.{k}"], v) for k, v in before.items())
