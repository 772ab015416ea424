"""Fine-tuning, CAR-FT and WiSE-FT: the invariants that catch a wrong implementation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import cifar_cell, derived_state, run_cifar_suite, same_outputs, write_cifar10

from robench.errors import RobenchError
from robench.methods import make_method
from robench.methods.finetune import FineTuneOptions
from robench.models import finetune as FT
from robench.models.wise_ft import interpolate

OPTS = "{train_on: cifar10-train, epochs: 2, lr: 1.0e-3, batch_size: 16, warmup: 2, workers: 0}"
SUITE = f"""
models:
  - tiny-random
  - {{name: ft, arch: robench-tiny-vit, method: finetune, options: {OPTS}}}
  - {{name: car, arch: robench-tiny-vit, method: car-ft, options: {OPTS}}}
  - {{name: car0, arch: robench-tiny-vit, method: car-ft, options: {OPTS[:-1]}, lam: 0.0}}}}
  - {{name: wise, arch: robench-tiny-vit, method: wise-ft,
      options: {{finetuned: ft, alphas: [0, 0.5, 1]}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 64}}
metrics: {{bootstrap: 0}}
progress: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    return run_cifar_suite(tmp, SUITE)


_cell = cifar_cell


def test_wise_ft_endpoints_reproduce_zeroshot_and_finetuned_exactly(run):
    runner, out = run
    assert {"wise-a0", "wise-a0.5", "wise-a1"} <= set(runner.models)
    assert same_outputs(_cell(out, "wise-a0"), _cell(out, "tiny-random"))
    assert same_outputs(_cell(out, "wise-a1"), _cell(out, "ft"))
    assert not same_outputs(_cell(out, "wise-a0.5"), _cell(out, "ft"))


def test_finetuning_changes_the_model_and_car_ft_with_lambda0_is_finetune(run):
    runner, out = run
    assert not same_outputs(_cell(out, "ft"), _cell(out, "tiny-random"))
    ft, car0, car = (derived_state(runner.prepared(m).pretrained) for m in ("ft", "car0", "car"))
    assert all(torch.equal(ft[k], car0[k]) for k in ft)
    assert not all(torch.equal(ft[k], car[k]) for k in ft)  # the KL term does something
    assert same_outputs(_cell(out, "ft"), _cell(out, "car0"))


def test_car_ft_kl_is_zero_at_initialisation_and_lambda0_is_ce():
    torch.manual_seed(0)
    feats, logits = torch.randn(8, 16), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    ctx = torch.nn.functional.normalize(torch.randn(16, 4), dim=0)
    total, kl = FT.car_ft_loss(logits, y, feats, feats.clone(), ctx, 100.0, lam=1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert total.item() == pytest.approx(ce.item(), abs=1e-6)
    total0, _ = FT.car_ft_loss(logits, y, feats, torch.randn(8, 16), ctx, 100.0, lam=0.0)
    assert total0.item() == pytest.approx(ce.item())
    _, kl2 = FT.car_ft_loss(logits, y, feats, torch.randn(8, 16), ctx, 100.0, lam=1.0)
    assert kl2.item() > 0


def test_context_weights_follow_the_definition(tiny_backbone, tmp_path):
    from robench.models.zeroshot import class_embeddings

    names, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a sketch of a {}."]
    v = FT.context_weights(tiny_backbone, names, templates, tmp_path)
    assert v.shape == (tiny_backbone.model.text_projection.shape[1], 2)
    with torch.no_grad():
        tok = tiny_backbone.tokenizer([templates[1].format(c) for c in names])
        e = torch.nn.functional.normalize(tiny_backbone.model.encode_text(tok), dim=-1)
        ref = torch.nn.functional.normalize(e.mean(0), dim=0)
    torch.testing.assert_close(v[:, 1], ref, atol=1e-5, rtol=1e-4)
    assert class_embeddings(tiny_backbone, names, templates[:1], tmp_path).shape == (v.shape[0], 3)


def _die_after(src, n: int):
    """Make ``src`` raise KeyboardInterrupt on its (n+1)-th image read; returns the real
    reader to put back."""
    calls = {"n": 0}
    real = src.loader

    def dying(i):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(i)

    src.loader = dying
    return real


def _resume_case(tmp_path, **extra):
    """A 2-epoch fine-tuning of the tiny ViT on 40 CIFAR images: (source, options, templates,
    a fresh backbone factory, the uninterrupted result)."""
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=8), name="c",
                     options=cifar.CifarOptions(train=True))
    opts = FineTuneOptions(**{"train_on": "c", "epochs": 2, "lr": 1e-3, "batch_size": 16,
                              "warmup": 1, "workers": 0, **extra})
    templates = ["a photo of a {}."]

    def fresh():
        return FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=5)

    ref = FT.finetune(fresh(), src, templates, opts, tmp_path / "ref", tmp_path / "cache",
                      progress=False)
    return src, opts, templates, fresh, ref


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, tiny_backbone):
    src, opts, templates, fresh, ref = _resume_case(tmp_path)
    real = _die_after(src, len(src) + 5)  # during the second epoch, like a killed job
    with pytest.raises(KeyboardInterrupt):
        FT.finetune(fresh(), src, templates, opts, tmp_path / "int", tmp_path / "cache",
                    progress=False)
    assert (tmp_path / "int" / FT.CHECKPOINT).is_file()
    src.loader = real
    out = FT.finetune(fresh(), src, templates, opts, tmp_path / "int", tmp_path / "cache",
                         progress=False)
    a, b = derived_state(ref), derived_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wise_ft_helpers_and_errors():
    declared = {"finetuned": "ft", "alphas": [0, 0.25]}
    expanded = make_method("wise-ft", declared).expand("w", declared)
    assert expanded == [("w-a0", {"finetuned": "ft", "alpha": 0.0}),
                        ("w-a0.25", {"finetuned": "ft", "alpha": 0.25})]
    with pytest.raises(RobenchError, match="options.finetuned"):
        make_method("wise-ft", {})
    with pytest.raises(RobenchError, match="alphas=.*<= 1"):
        make_method("wise-ft", {"finetuned": "ft", "alphas": [0.5, 1.5]})
    zs, ft = {"a": torch.ones(2), "n": torch.tensor(3)}, {"a": torch.zeros(2), "n": torch.tensor(3)}
    assert torch.equal(interpolate(zs, ft, 0.25)["a"], torch.full((2,), 0.75))
    with pytest.raises(RobenchError, match="different parameters"):
        interpolate(zs, {"b": torch.ones(2)}, 0.5)


def test_finetune_option_errors():
    with pytest.raises(RobenchError, match="train_on"):
        make_method("finetune", {})
    with pytest.raises(RobenchError, match="Did you mean 'epochs'"):
        make_method("finetune", {"train_on": "a", "epoch": 3})
    with pytest.raises(RobenchError, match="unknown car-ft precision 'fp8'"):
        make_method("car-ft", {"train_on": "a", "precision": "fp8"})
    assert make_method("car-ft", {"train_on": "a"}).options.lam == 1.0
    assert make_method("finetune", {"train_on": "a"}).options.lam == 0.0


def test_epoch_order_is_the_order_a_shuffling_dataloader_draws():
    g = torch.Generator().manual_seed(7 * 1000 + 3)
    loader = torch.utils.data.DataLoader(range(50), batch_size=50, shuffle=True, generator=g)
    assert FT.epoch_order(50, 7, 3) == next(iter(loader)).tolist()
    assert FT.epoch_order(50, 7, 3) != FT.epoch_order(50, 7, 4)


@pytest.mark.parametrize("size,micro", [(1, 0), (2, 0), (2, 4), (3, 2), (4, 0)])
def test_rank_steps_split_every_global_batch_once_with_equal_micro_batch_counts(size, micro):
    from robench.distributed import World

    order = FT.epoch_order(45, 0, 0)
    per_rank = [FT.rank_steps(order, 11, World(rank=r, size=size), micro) for r in range(size)]
    assert all(len(s) == 5 for s in per_rank)  # ceil(45 / 11) global steps on every rank
    for step in range(5):
        batch = order[step * 11:(step + 1) * 11]
        counts = {len(s[step][1]) for s in per_rank}
        assert len(counts) == 1  # DDP needs the same number of backward passes on every rank
        real = [i for s in per_rank for m, ok in s[step][1] if ok for i in m]
        assert real == batch  # contiguous parts in rank order: no padding, no duplicates
        assert all(s[step][0] == len(batch) for s in per_rank)
        if micro:
            assert all(len(m) <= micro for s in per_rank for m, _ in s[step][1])
    # a last batch of one sample (45 = 4 x 11 + 1): the other ranks run a zero-weight placeholder
    if size > 1:
        last = [m for s in per_rank for m in s[-1][1]]
        assert len(last) == size and all(m == [order[44]] for m, _ in last)
        assert sum(ok for _, ok in last) == 1


def test_resume_mid_epoch_from_a_step_checkpoint_gives_the_same_weights(tmp_path, tiny_backbone):
    src, opts, templates, fresh, ref = _resume_case(tmp_path, checkpoint_every=1)
    # in the 2nd step of the 2nd epoch (3 steps of 16 per epoch of 40)
    real = _die_after(src, len(src) + 16 + 5)
    with pytest.raises(KeyboardInterrupt):
        FT.finetune(fresh(), src, templates, opts, tmp_path / "int", tmp_path / "cache",
                    progress=False)
    state = torch.load(tmp_path / "int" / FT.CHECKPOINT, weights_only=True)
    assert state["step"] == 4  # mid-epoch: 3 steps of epoch 1, 1 of epoch 2
    src.loader = real
    out = FT.finetune(fresh(), src, templates, opts, tmp_path / "int", tmp_path / "cache",
                      progress=False)
    a, b = derived_state(ref), derived_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "int" / FT.CHECKPOINT).exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_under_autocast(tmp_path, precision):
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=4), name="c",
                     options=cifar.CifarOptions(train=True))
    # fp16: the GradScaler skips the first steps (inf gradients at its initial scale 2^16)
    # until the scale has come down, so the run needs more steps than bf16 to move the weights
    opts = FineTuneOptions(train_on="c", epochs=1, lr=1e-3, batch_size=2, warmup=1, workers=0,
                           lam=1.0)
    templates = ["a photo of a {}.", "a sketch of a {}."]
    base = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=5)
    w0 = {k: v.clone() for k, v in base.model.visual.state_dict().items()}
    seen = []
    forward = base.model.visual.forward

    def spy(x):  # what the encoder computes in: autocast's dtype, not float32
        out = forward(x)
        seen.append(out.dtype)
        return out

    base.model.visual.forward = spy
    out = FT.finetune(base, src, templates, replace(opts, precision=precision),
                      tmp_path / precision, tmp_path / "cache", progress=False)
    state = derived_state(out)
    assert set(seen) == {FT.PRECISIONS[precision]}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[f"visual.{k}"], v) for k, v in w0.items())


def test_unknown_training_precision_is_an_error(tmp_path, tiny_backbone):
    with pytest.raises(RobenchError, match="precision"):
        FT.finetune(tiny_backbone, [], [], FineTuneOptions(precision="fp8"), tmp_path,
                    tmp_path)
