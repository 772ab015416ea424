"""FLYP: the invariants that define it (Goyal et al. 2023) -- open_clip's CLIP loss, over the
GLOBAL batch under torchrun; lr 0 is the zero-shot model exactly; both towers trained, nothing
frozen; a seeded uniform template per sample; resume after a kill; zero-shot head of the
fine-tuned text tower; WiSE-FT mixes both towers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, cifar_cell, derived_state, run_cifar_suite, same_outputs, write_cifar10
from open_clip.loss import ClipLoss

from robench.errors import RobenchError
from robench.methods import make_method
from robench.methods.base import HeadContext
from robench.models import finetune as FT
from robench.models import flyp as FL
from robench.models.zeroshot import store_key

OPTS = "train_on: cifar10-train, epochs: 2, batch_size: 16, warmup: 2, workers: 0"
SUITE = f"""
models:
  - tiny-random
  - {{name: flyp0, arch: robench-tiny-vit, method: flyp, options: {{{OPTS}, lr: 0}}}}
  - {{name: flyp, arch: robench-tiny-vit, method: flyp, options: {{{OPTS}, lr: 1.0e-3}}}}
  - {{name: wise, arch: robench-tiny-vit, method: wise-ft,
      options: {{finetuned: flyp, alphas: [0, 0.5, 1]}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 64}}
metrics: {{bootstrap: 0}}
progress: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flyp")
    runner, out = run_cifar_suite(tmp, SUITE)
    return runner, out, tmp


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1))


# -- the loss -----------------------------------------------------------------------------------
def test_the_loss_is_open_clips_clip_loss():
    img, txt = _features(12)
    scale = torch.tensor(14.3)
    ref = ClipLoss()(img, txt, scale)
    assert FL.clip_loss(img, txt, scale).item() == pytest.approx(ref.item(), rel=1e-6)
    # one rank's share with no gather (it normalises the raw features itself) is the same
    # loss, value and gradient
    raw = 3 * torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    a, b = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    mine = FL.rank_loss(a, txt, scale, [12], 0, 12)
    theirs = ClipLoss()(F.normalize(b, dim=-1), txt, scale)
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6)
    mine.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_duplicates_of_a_class_are_negatives_as_in_flyps_code():
    """Two samples of one class with the same template have identical captions: each image's
    positive is still its own caption only (open_clip ClipLoss, labels arange(N)), so the
    duplicate caption counts as a negative -- the loss is at least ln 2 per direction for them."""
    img, txt = _features(4)
    txt[1] = txt[0]  # sample 1 is captioned exactly like sample 0
    scale = torch.tensor(100.0)
    loss = FL.clip_loss(img, txt, scale)
    assert loss.item() == pytest.approx(ClipLoss()(img, txt, scale).item(), rel=1e-6)
    # image 0 cannot tell its caption from sample 1's: p(own caption) <= 1/2
    per_image = F.cross_entropy(scale * img @ txt.T, torch.arange(4), reduction="none")
    assert per_image[0].item() >= np.log(2) - 1e-6 and per_image[1].item() >= np.log(2) - 1e-6


def _rank_loss_worker(rank: int, world: int, port: int, cases: list[list[int]], queue) -> None:
    """One gloo rank: for each case (the ranks' part sizes), its part of a global batch through
    a shared linear 'encoder' W, FLYP's rank loss, backward; the gradient of W is summed over
    the ranks (as the DDP hook does). One process group serves every case (spawning is the
    slow part)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for case, sizes in enumerate(cases):
        n = sum(sizes)
        x, y = _features(n, seed=1)
        w = torch.eye(8).requires_grad_()
        start = sum(sizes[:rank])
        mine = slice(start, start + max(sizes[rank], 1)) if sizes[rank] else slice(0, 1)
        loss = FL.rank_loss(x[mine] @ w, y[mine] @ w.T, torch.tensor(9.0), sizes, rank, n)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        dist.all_reduce(w.grad)
        # open_clip's own gathered loss (equal parts only): every rank computes the global loss
        oc = None
        if len(set(sizes)) == 1:
            w2 = torch.eye(8).requires_grad_()
            clip = ClipLoss(gather_with_grad=True, rank=rank, world_size=world)
            part = clip(F.normalize(x[mine] @ w2, dim=-1), F.normalize(y[mine] @ w2.T, dim=-1),
                        torch.tensor(9.0))
            part.backward()
            dist.all_reduce(w2.grad)
            oc = (part.item(), (w2.grad / world).numpy())  # DDP's mean over ranks
        queue.put((case, rank, total.item(), w.grad.numpy(), oc))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_two_ranks_the_loss_and_gradient_are_the_global_batchs():
    """Gathered with gradient, the ranks' shares sum to the loss of the whole batch and their
    summed gradients to its gradient -- uneven parts and a placeholder rank included; with
    equal parts, also open_clip's ClipLoss(gather_with_grad=True) under DDP's averaging."""
    cases = [[3, 3], [3, 2], [1, 0]]
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_loss_worker, args=(r, 2, port, cases, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, list] = {}
    for _ in range(len(cases) * len(procs)):
        case, _rank, *rest = queue.get(timeout=180)
        got.setdefault(case, []).append(rest)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for case, sizes in enumerate(cases):
        n = sum(sizes)
        x, y = _features(n, seed=1)
        w = torch.eye(8).requires_grad_()
        ref = FL.clip_loss(F.normalize(x @ w, dim=-1), F.normalize(y @ w.T, dim=-1),
                           torch.tensor(9.0))
        ref.backward()
        assert len(got[case]) == 2, sizes
        for total, grad, oc in got[case]:
            assert total == pytest.approx(ref.item(), rel=1e-6), sizes
            np.testing.assert_allclose(grad, w.grad.numpy(), rtol=1e-5, atol=1e-6)
            if oc is not None:
                assert oc[0] == pytest.approx(ref.item(), rel=1e-6)
                np.testing.assert_allclose(oc[1], w.grad.numpy(), rtol=1e-5, atol=1e-6)
        assert (oc is not None) == (len(set(sizes)) == 1)


# -- captions -------------------------------------------------------------------------------
def test_each_sample_gets_a_seeded_uniform_template(tmp_path, tiny_backbone):
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=4), name="c",
                     options=cifar.CifarOptions(train=True))
    templates = ["a photo of a {}.", "a sketch of a {}.", "art of the {}."]
    ds = FL._Captioned(src, FT.train_transform(tiny_backbone), 0, 3, templates,
                       tiny_backbone.tokenizer)
    for i in (0, 7, 19):
        t = FL.template_index(0, 3, i, len(templates))
        expected = tiny_backbone.tokenizer([templates[t].format(src.classnames[src.labels[i]])])
        assert torch.equal(ds[i][1], expected[0])
    picks = [FL.template_index(0, 0, i, 3) for i in range(3000)]
    assert all(900 < c < 1100 for c in Counter(picks).values())  # uniform
    assert picks == [FL.template_index(0, 0, i, 3) for i in range(3000)]  # seeded
    assert picks != [FL.template_index(0, 1, i, 3) for i in range(3000)]  # fresh per epoch
    assert picks != [FL.template_index(1, 0, i, 3) for i in range(3000)]


# -- training -------------------------------------------------------------------------------
def _case(tmp_path, arch="robench-tiny-vit", pretrained=None, **extra):
    from robench.data import cifar

    src = cifar.load(write_cifar10(tmp_path / "c", n_train=8), name="c",
                     options=cifar.CifarOptions(train=True))
    opts = make_method("flyp", {"train_on": "c", "epochs": 2, "lr": 1e-3, "batch_size": 16,
                                "warmup": 1, "workers": 0, **extra}).options
    templates = ["a photo of a {}.", "a sketch of a {}."]

    def fresh():
        return FT.load_backbone(arch, pretrained, device="cpu", seed=5)

    return src, opts, templates, fresh


def test_both_towers_and_the_temperature_are_trained_nothing_frozen(tmp_path):
    src, opts, templates, fresh = _case(tmp_path, weight_decay=0.0)  # no decay: only gradients
    base = fresh()
    before = {k: v.clone() for k, v in base.model.named_parameters()}
    out = FL.flyp_finetune(base, src, templates, opts, tmp_path / "o", progress=False)
    after = derived_state(out)
    unchanged = [k for k, v in before.items() if torch.equal(after[k], v)]
    assert unchanged == []  # every parameter moved: text tower, embeddings, logit scale too
    assert any(k.startswith("transformer.") for k in before) and "logit_scale" in before
    assert FT.read_head(out).kind == "text"


def test_at_lr_0_every_parameter_stays_and_only_batchnorm_statistics_move(tmp_path):
    """lr 0 leaves every weight bit for bit (AdamW: p * (1 - 0) + 0 * step); a ModifiedResNet
    image tower (the quickstart's tiny CLIP) still updates its BatchNorm running statistics
    in training mode, as pre-training does: the exact lr-0 identity holds for towers without
    them (ViTs), as the suite test checks end to end."""
    assets = REPO / "robench" / "assets" / "models" / "robench-tiny-clip-cifar10.pt"
    src, opts, templates, fresh = _case(tmp_path, arch="robench-tiny-clip",
                                        pretrained=str(assets), lr=0.0, epochs=1)
    base = fresh()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    params = {k for k, _ in base.model.named_parameters()}
    after = derived_state(FL.flyp_finetune(base, src, templates, opts, tmp_path / "o",
                                           progress=False))
    moved = {k for k in before if not torch.equal(after[k].to(before[k].dtype), before[k])}
    assert moved and not moved & params
    assert all(k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
               for k in moved)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    src, opts, templates, fresh = _case(tmp_path, checkpoint_every=1)
    ref = FL.flyp_finetune(fresh(), src, templates, opts, tmp_path / "ref", progress=False)
    real, calls = src.loader, {"n": 0}

    def dying(i):  # in the 2nd step of the 2nd epoch (3 steps of 16 per epoch of 40)
        calls["n"] += 1
        if calls["n"] > len(src) + 16 + 5:
            raise KeyboardInterrupt
        return real(i)

    src.loader = dying
    with pytest.raises(KeyboardInterrupt):
        FL.flyp_finetune(fresh(), src, templates, opts, tmp_path / "int", progress=False)
    assert torch.load(tmp_path / "int" / FT.CHECKPOINT, weights_only=True)["step"] == 4
    src.loader = real
    out = FL.flyp_finetune(fresh(), src, templates, opts, tmp_path / "int", progress=False)
    a, b = derived_state(ref), derived_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "int" / FT.CHECKPOINT).exists()


# -- the suite ------------------------------------------------------------------------------
def test_at_lr_0_the_model_and_head_are_the_zero_shot_models_exactly(run):
    runner, out, tmp = run
    zs = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0).model.state_dict()
    state = derived_state(runner.prepared("flyp0").pretrained)
    assert all(torch.equal(state[k], zs[k]) for k in zs)
    assert same_outputs(cifar_cell(out, "flyp0"), cifar_cell(out, "tiny-random"))


def test_the_head_is_the_fine_tuned_text_towers_prompt_ensemble(run):
    runner, out, tmp = run
    zs = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0).model.state_dict()
    state = derived_state(runner.prepared("flyp").pretrained)
    text = [k for k in zs if k.startswith(("transformer.", "token_embedding", "ln_final",
                                           "text_projection", "positional_embedding"))]
    assert text and all(not torch.equal(state[k], zs[k]) for k in text)
    assert not torch.equal(state["logit_scale"], zs["logit_scale"])
    # the fine-tuned weights have a text store of their own (lr 0 shares the zero-shot one)
    ft = FT.load_backbone("robench-tiny-vit", runner.prepared("flyp").pretrained, device="cpu")
    zero = FT.load_backbone("robench-tiny-vit", runner.prepared("flyp0").pretrained,
                            device="cpu")
    templates = runner.templates_for("cifar10")
    stores = {m: store_key(b, templates) for m, b in
              (("zs", FT.load_backbone("robench-tiny-vit", None, device="cpu")), ("flyp", ft),
               ("flyp0", zero))}
    assert stores["flyp"] != stores["zs"] == stores["flyp0"]
    assert all((tmp / "c" / "text" / k).is_dir() for k in stores.values())
    src = runner.source("cifar10")
    import open_clip

    with torch.no_grad():
        ref = open_clip.build_zero_shot_classifier(
            ft.model, ft.tokenizer, [c for c in src.classnames],
            [lambda c, t=t: t.format(c) for t in runner.templates_for("cifar10")],
            num_classes_per_batch=None, device="cpu", use_tqdm=False)
    head = runner.method_of("flyp").build(HeadContext(ft, runner.prepared("flyp"), runner), src)
    np.testing.assert_allclose(head.weight, ref.numpy(), rtol=1e-5, atol=1e-6)
    assert head.scale == pytest.approx(float(state["logit_scale"].exp()))
    assert not same_outputs(cifar_cell(out, "flyp"), cifar_cell(out, "tiny-random"))


def test_wise_ft_of_flyp_interpolates_both_towers_and_reads_the_head_from_the_mix(run):
    runner, out, _ = run
    assert same_outputs(cifar_cell(out, "wise-a0"), cifar_cell(out, "tiny-random"))
    assert same_outputs(cifar_cell(out, "wise-a1"), cifar_cell(out, "flyp"))
    zs = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0).model.state_dict()
    ft = derived_state(runner.prepared("flyp").pretrained)
    mid = derived_state(runner.prepared("wise-a0.5").pretrained)
    for k in ("transformer.resblocks.0.attn.in_proj_weight", "logit_scale", "visual.proj"):
        torch.testing.assert_close(mid[k], 0.5 * zs[k] + 0.5 * ft[k])
    assert FT.read_head(runner.prepared("wise-a0.5").pretrained).kind == "text"
    assert not same_outputs(cifar_cell(out, "wise-a0.5"), cifar_cell(out, "flyp"))


# -- torchrun -------------------------------------------------------------------------------
TORCHRUN_SUITE = """
models:
  - {name: flyp, arch: robench-tiny-vit, method: flyp,
     options: {train_on: cifar10-train, epochs: 1, lr: 1.0e-3, batch_size: 11, warmup: 2,
               workers: 0}}
datasets: [cifar10]
model: {num_workers: 0, batch_size: 16}
metrics: {bootstrap: 0}
progress: false
"""


def test_two_torchrun_ranks_train_the_weights_of_one_process(tmp_path):
    """45 images in global batches of 11 over 2 ranks (6 + 5 per step, a last batch of 1 with
    a placeholder on rank 1): the gathered global-batch loss gives the weights of one process
    up to float summation order. A per-rank loss (5-6 negatives instead of 11) would not."""
    from robench.config import load_suite
    from robench.runner import Runner

    write_cifar10(tmp_path / "data" / "cifar10", n_test=10, n_train=9)
    (tmp_path / "s.yaml").write_text(TORCHRUN_SUITE)

    def args(tag: str) -> list[str]:
        return [f"data_root={tmp_path / 'data'}", f"cache_dir={tmp_path / tag}",
                f"results_dir={tmp_path / ('r' + tag)}", "device=cpu"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1)
    try:
        one = Runner(load_suite(str(tmp_path / "s.yaml"), args("1")))
        one.run()
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "robench.cli", "run", f"suite={tmp_path / 's.yaml'}", *args("2")]
    two = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a = derived_state(one.prepared("flyp").pretrained)
    (folder,) = (tmp_path / "2" / "artifacts" / "flyp").glob("*/model")
    b = derived_state(f"local-dir:{folder}")
    zs = FT.load_backbone("robench-tiny-vit", None, device="cpu", seed=0).model.state_dict()

    def kept(name: str, t: torch.Tensor) -> torch.Tensor:
        """All entries but the attention KEY biases: their gradient is 0 in exact arithmetic
        (q.b_k is the same for every key, softmax ignores it), so AdamW turns summation-order
        noise into lr-sized steps of random sign there, whatever the loss."""
        if name.endswith("attn.in_proj_bias"):
            d = t.numel() // 3
            return torch.cat([t[:d], t[2 * d:]])
        return t.flatten()

    gap = torch.cat([kept(k, (a[k] - b[k]).abs()) for k in a])
    moved = torch.cat([kept(k, (a[k] - zs[k]).abs()) for k in a])
    # measured: moved max 3.9e-3, mean 1.4e-4; gap max 4.4e-6, mean 1.2e-10
    assert moved.max() > 1e-3
    assert gap.max() < 1e-4 and gap.mean() < 1e-3 * moved.mean()


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("given,match", [
    ({}, "train_on"),
    ({"train_on": "a", "micro_batch": 4}, "flyp option"),
    ({"train_on": "a", "batch_size": 1}, "batch_size"),
    ({"train_on": "a", "precision": "fp8"}, "precision"),
])
def test_bad_options_are_named_errors(given, match):
    with pytest.raises(RobenchError, match=match):
        make_method("flyp", given, "m")


def test_a_training_split_without_templates_is_refused(tmp_path):
    src, opts, _, fresh = _case(tmp_path)
    with pytest.raises(RobenchError, match="templates"):
        FL.flyp_finetune(fresh(), src, [], opts, Path(tmp_path / "o"), progress=False)
