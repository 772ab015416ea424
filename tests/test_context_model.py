"""The shipped tiny CLIP is context-aware, so CAR-FT's context regulariser has something to keep.

CAR-FT's term KL(p_ctx(x; theta_0) || p_ctx(x; theta)) is a softmax over one context vector per
template of the fine-tuning split (``finetune.context_weights``). The model shipped before this
one was trained on captions that never named a context: its 18 CIFAR context vectors had a mean
pairwise cosine of 0.9998, so p_ctx was uniform for every image and the KL ~6e-5 whatever the
weights (CAR-FT ended within 0.006% of plain fine-tuning). These tests fail on such a model:
the quickstart's context vectors must differ, the image tower must recognise the contexts the
vectors stand for, and moving the image tower off theta_0 must cost a KL that is large and pulls
the weights back.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import script_module

from robench.models import finetune as FT
from robench.models.backbone import load_backbone
from robench.registry import get_dataset, template_set

REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "robench" / "assets" / "models" / "robench-tiny-clip-cifar10.pt"
SUBSET = REPO / "robench" / "assets" / "cifar10-subset"
QUICKSTART_SPLITS = ("cifar10-subset-probe", "cifar10-subset-val", "cifar10-subset-test",
                     "cifar10-subset-test-c")
# Thresholds, with the shipped model's value and the old one's (its own 18 CIFAR templates;
# on the 9 context templates it scores 0.9997, 9.1% and 2.2e-5):
MAX_MEAN_COSINE = 0.8  # mean pairwise cosine of the context vectors; shipped 0.46, old 0.9998
MIN_CONTEXT_TOP1 = 50.0  # % of val images whose applied context is p_ctx's argmax (chance 11.1);
#                          shipped 81.8
MIN_PERTURBED_KL = 1e-2  # KL at 3% weight noise on 256 val images; shipped 0.27, old 1.6e-5


@pytest.fixture(scope="module")
def shipped():
    return load_backbone("robench-tiny-clip", str(CKPT), device="cpu")


@pytest.fixture(scope="module")
def val():
    """The val split decoded once: uint8 (500, 3, 32, 32), labels, class names."""
    return script_module("train_tiny_clip").load_split(SUBSET / "val")


@pytest.fixture(scope="module")
def contexts(shipped, val, tmp_path_factory):
    """The quickstart's (D, M) context vectors under the shipped model."""
    return FT.context_weights(shipped, val[2], template_set("cifar-context"),
                              tmp_path_factory.mktemp("text"))


def _inputs(backbone, images: torch.Tensor) -> torch.Tensor:
    mod = script_module("train_tiny_clip")
    return mod.to_input(images, *mod.normalizer(backbone.preprocess))


def test_quickstart_splits_use_the_context_set_the_model_was_trained_on():
    templates = template_set("cifar-context")
    assert all(t.count("{}") == 1 for t in templates) and len(set(templates)) == len(templates)
    # the training script knows an image op for every template, and only for those
    ops = script_module("train_tiny_clip").context_ops(templates)
    assert len(ops) == len(templates) and sum(op is None for op in ops) == 1
    for name in QUICKSTART_SPLITS:  # CAR-FT's contexts come from its training split's set
        assert get_dataset(name).templates == "cifar-context", name
    assert get_dataset("cifar10").templates == "cifar" and len(template_set("cifar")) == 18


def test_context_vectors_differ(contexts):
    cos = script_module("context_diagnostics").pairwise_cosines(contexts)
    assert len(cos) == 9 * 8 // 2
    assert cos.mean() < MAX_MEAN_COSINE, cos.mean()
    # the measure itself: identical context vectors (the old model's case) read as 1 and fail
    same = script_module("context_diagnostics").pairwise_cosines(contexts[:, :1].repeat(1, 9))
    assert same.mean() == pytest.approx(1.0, abs=1e-6) and not same.mean() < MAX_MEAN_COSINE


@torch.no_grad()
def test_the_image_tower_recognises_the_contexts(shipped, val, contexts):
    """Each context applied to the val images (the training script's ops, fresh randomness):
    p_ctx's argmax names the applied context far above chance."""
    mod = script_module("train_tiny_clip")
    templates = template_set("cifar-context")
    images = val[0]
    gen = torch.Generator().manual_seed(123)
    ops = mod.context_ops(templates)
    hits = []
    for i in range(len(ops)):
        x = mod.apply_contexts(images, torch.full((len(images),), i), ops, gen)
        f = shipped.model.encode_image(_inputs(shipped, x), normalize=True)
        hits.append(float((f @ contexts).argmax(1).eq(i).float().mean()) * 100)
    assert np.mean(hits) > MIN_CONTEXT_TOP1, dict(zip(templates, hits, strict=True))


def _perturbed(visual: torch.nn.Module, rel: float, seed: int) -> torch.nn.Module:
    """A copy of ``visual`` with Gaussian noise of ``rel`` x each tensor's RMS added."""
    out = copy.deepcopy(visual)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(rel * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=g))
    return out


def test_car_ft_kl_at_perturbed_weights_is_large_and_pulls_back(shipped, val, contexts):
    """At theta_0 the KL is 0; 3% noise on the image tower's weights costs a KL well above the
    old model's ~1e-4 level, and the KL's gradient points back towards theta_0 (one step
    down it lowers the KL)."""
    x = _inputs(shipped, val[0][:256])
    y = val[1][:256]
    visual0 = shipped.model.visual.eval()
    scale = shipped.logit_scale
    with torch.no_grad():
        f0 = visual0(x)
    logits = torch.zeros(len(x), 10)  # the CE part is not under test

    def kl_of(visual: torch.nn.Module) -> torch.Tensor:
        return FT.car_ft_loss(logits, y, visual(x), f0, contexts, scale, lam=1.0)[1]

    with torch.no_grad():
        assert float(kl_of(visual0)) == pytest.approx(0.0, abs=1e-7)
    moved = _perturbed(visual0, 0.03, seed=0).eval()
    kl = kl_of(moved)
    assert float(kl.detach()) > MIN_PERTURBED_KL
    kl.backward()
    params0 = dict(visual0.named_parameters())
    grad = torch.cat([p.grad.flatten() for _, p in moved.named_parameters()])
    away = torch.cat([(p - params0[n]).detach().flatten() for n, p in moved.named_parameters()])
    assert float(torch.nn.functional.cosine_similarity(grad, away, dim=0)) > 0
    with torch.no_grad():
        for p in moved.parameters():
            p.sub_(1e-3 * p.grad / grad.norm())
        assert float(kl_of(moved)) < float(kl.detach())
    # the same perturbation seen through identical context vectors costs nothing
    flat = contexts[:, :1].repeat(1, contexts.shape[1])
    with torch.no_grad():
        kl_flat = FT.car_ft_loss(logits, y, moved(x), f0, flat, scale, lam=1.0)[1]
    assert float(kl_flat) == pytest.approx(0.0, abs=1e-6)


DIAG_OPTS = ("{train_on: cifar10-train, epochs: 1, lr: 1.0e-3, batch_size: 16, warmup: 1, "
             "workers: 0}")
DIAG_SUITE = f"""
models:
  - {{name: ft, arch: robench-tiny-vit, method: finetune, options: {DIAG_OPTS}}}
  - {{name: car, arch: robench-tiny-vit, method: car-ft, options: {DIAG_OPTS[:-1]}, lam: 1.0}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 64}}
"""


def test_diagnostics_script_measures_through_the_runner(tmp_path):
    """scripts/context_diagnostics.py on a tiny suite: the runner trains both checkpoints, the
    KL figures are CAR-FT's own loss on the cached features, and ``templates`` replaces the
    fine-tuning split's prompt set (CAR-FT's contexts, so a new checkpoint)."""
    from conftest import write_cifar10

    from robench.features import extract_features
    from robench.models.backbone import load_backbone as load

    write_cifar10(tmp_path / "data" / "cifar10", n_test=20, n_train=8)
    (tmp_path / "s.yaml").write_text(DIAG_SUITE)
    diag = script_module("context_diagnostics")
    over = [f"data_root={tmp_path / 'data'}"]
    out = diag.diagnose(str(tmp_path / "s.yaml"), str(tmp_path / "c"), datasets=["cifar10"],
                        overrides=over)
    assert out["template_set"] == "cifar" and out["n_contexts"] == 18
    assert out["train_on"] == "cifar10-train" and out["car_ft_lam"] == 1.0
    assert -1 <= out["context_cosine"]["min"] <= out["context_cosine"]["mean"] <= 1
    kl = out["context_kl"]["cifar10"]
    assert kl["finetune"] > 0 and kl["car-ft"] > 0 and kl["finetune"] != kl["car-ft"]
    assert out["car_vs_ft_distance"]["rel_to_ft_displacement"] > 0
    # the reported KL is car_ft_loss's, on the features robench caches for each checkpoint
    from robench.config import load_suite
    from robench.data import cifar
    from robench.runner import Runner

    runner = Runner(load_suite(str(tmp_path / "s.yaml"),
                               [f"cache_dir={tmp_path / 'c'}", "device=cpu", *over]))
    src = cifar.load(tmp_path / "data" / "cifar10", name="cifar10")
    base = load("robench-tiny-vit", None, device="cpu")
    ctx = FT.context_weights(base, list(src.classnames), template_set("cifar"), tmp_path / "c")
    feats = {m: extract_features(load("robench-tiny-vit", runner.prepared(m).pretrained,
                                      device="cpu"), src, tmp_path / "c", num_workers=0,
                                 progress=False).features for m in ("ft", "car")}
    f0 = extract_features(base, src, tmp_path / "c", num_workers=0, progress=False).features
    assert diag.context_kl(f0, feats["car"], ctx, base.logit_scale) == \
        pytest.approx(kl["car-ft"], rel=1e-6)
    other = diag.diagnose(str(tmp_path / "s.yaml"), str(tmp_path / "c"), templates="cifar-context",
                          datasets=["cifar10"], overrides=over)
    assert other["template_set"] == "cifar-context" and other["n_contexts"] == 9
    assert other["context_kl"]["cifar10"]["car-ft"] != kl["car-ft"]  # CAR-FT trained anew
