"""Derived checkpoints (fine-tuned, CAR-FT, WiSE-FT) are the network that was trained: they
reload with the parent's architecture config (QuickGELU) and preprocessing."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import TINY, cifar_cell, run_cifar_suite, same_outputs

from robench.models.backbone import CONFIG_DIR, load_backbone, save_derived

PREPROCESS = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
              "resize_mode": "squash"}


def _quickgelu_cfg() -> dict:
    cfg = json.loads((CONFIG_DIR / f"{TINY}.json").read_text())
    return {**cfg, "quick_gelu": True}


def _acts(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A QuickGELU network with non-default mean / std / interpolation, as a local-dir folder."""
    d = tmp_path_factory.mktemp("parent")
    torch.manual_seed(3)
    model = open_clip.create_model(TINY, force_quick_gelu=True)
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": _quickgelu_cfg(), "preprocess_cfg": PREPROCESS}))
    return f"local-dir:{d}"


@pytest.fixture(scope="module")
def run(tmp_path_factory, parent):
    tmp = tmp_path_factory.mktemp("derived")
    opts = "train_on: cifar10-train, epochs: 1, batch_size: 16, warmup: 1, workers: 0"
    return run_cifar_suite(tmp, f"""
models:
  - {{name: zs, arch: {TINY}, pretrained: "{parent}"}}
  - {{name: ft0, arch: {TINY}, pretrained: "{parent}", method: finetune,
      options: {{{opts}, lr: 0.0}}}}
  - {{name: ft, arch: {TINY}, pretrained: "{parent}", method: finetune,
      options: {{{opts}, lr: 1.0e-3}}}}
  - {{name: car0, arch: {TINY}, pretrained: "{parent}", method: car-ft,
      options: {{{opts}, lr: 0.0, lam: 1.0}}}}
  - {{name: wise, arch: {TINY}, pretrained: "{parent}", method: wise-ft,
      options: {{finetuned: ft, alphas: [0, 1]}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 64}}
metrics: {{bootstrap: 0}}
progress: false
""")


_cell = cifar_cell


def test_lr0_finetune_and_car_ft_reproduce_the_parent_exactly(run):
    _, out = run
    assert same_outputs(_cell(out, "ft0"), _cell(out, "zs"))
    assert same_outputs(_cell(out, "car0"), _cell(out, "zs"))
    assert not same_outputs(_cell(out, "ft"), _cell(out, "zs"))


def test_wise_ft_endpoints_are_exact(run):
    _, out = run
    assert same_outputs(_cell(out, "wise-a0"), _cell(out, "zs"))
    assert same_outputs(_cell(out, "wise-a1"), _cell(out, "ft"))


def test_derived_checkpoints_reload_with_quickgelu_and_the_parents_preprocessing(run, parent):
    runner, _ = run
    ref = load_backbone(TINY, parent, device="cpu")
    assert _acts(ref.model) == {"QuickGELU"}
    for name in ("ft", "car0", "wise-a0", "wise-a1"):
        spec = runner.prepared(name)
        assert spec.pretrained.startswith("local-dir:")
        folder = spec.pretrained.removeprefix("local-dir:")
        saved = json.loads(open(f"{folder}/open_clip_config.json").read())
        assert saved["model_cfg"]["quick_gelu"] is True
        assert {k: saved["preprocess_cfg"][k] for k in PREPROCESS} == PREPROCESS
        b = load_backbone(TINY, spec.pretrained, device="cpu")
        assert _acts(b.model) == {"QuickGELU"}
        assert b.preprocess_cfg == ref.preprocess_cfg
        assert b.preprocess_id == ref.preprocess_id  # same resize, crop, mean / std


def test_the_activation_matters_for_these_weights(parent):
    """Negative control: the parent's weights in a GELU network compute other features, so the
    exact-equality tests above would catch a checkpoint reloaded without QuickGELU."""
    qg = load_backbone(TINY, parent, device="cpu")
    gelu = open_clip.create_model(TINY)
    gelu.load_state_dict(qg.model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(qg.model.encode_image(x), gelu.encode_image(x), atol=1e-4)


def test_a_quickgelu_tag_round_trips(tmp_path, monkeypatch, parent):
    """A pretrained *tag* whose config asks for QuickGELU and its own preprocessing (as the 27
    OpenAI tags do) -> derived folder -> the same network and transform."""
    weights = parent.removeprefix("local-dir:") + "/open_clip_pytorch_model.bin"
    tags = dict(open_clip.pretrained._PRETRAINED.get(TINY, {}))
    tags["qg_test"] = {"file": weights, "url": "", "hf_hub": "", "quick_gelu": True,
                       **PREPROCESS}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    b = load_backbone(TINY, "qg_test", device="cpu")
    assert b.model_cfg["quick_gelu"] is True and _acts(b.model) == {"QuickGELU"}
    spec = save_derived(b, b.model.state_dict(), tmp_path / "d")
    c = load_backbone(TINY, spec, device="cpu")
    assert c.weights_hash == b.weights_hash and c.preprocess_id == b.preprocess_id
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(b.encode_images(x), c.encode_images(x))
    assert b.id() != load_backbone(TINY, weights, device="cpu").id()  # GELU: another network
