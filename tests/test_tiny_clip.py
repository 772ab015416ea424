"""The shipped tiny CLIP: checksum, loading through robench, zero-shot accuracy, reproducibility."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import script_module

REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "robench" / "assets" / "models" / "robench-tiny-clip-cifar10.pt"
SUBSET = REPO / "robench" / "assets" / "cifar10-subset"
ARCH = "robench-tiny-clip"


def test_checkpoint_sha256_matches():
    line = CKPT.with_name(CKPT.name + ".sha256").read_text().split()
    assert line == [hashlib.sha256(CKPT.read_bytes()).hexdigest(), CKPT.name]
    meta = json.loads(CKPT.with_name(CKPT.name + ".json").read_text())
    assert meta["sha256"] == line[0] and meta["model"] == ARCH
    assert CKPT.stat().st_size < 8.5e6


def test_zeroshot_on_test_split_through_robench(tmp_path):
    from robench.data.folder import load
    from robench.features import extract_features
    from robench.models.backbone import load_backbone
    from robench.models.zeroshot import zeroshot_head
    from robench.registry import get_dataset, template_set

    bb = load_backbone(ARCH, str(CKPT), device="cpu")
    # fp16 on disk, loaded into the fp32 model by open_clip
    assert all(p.dtype == torch.float32 for p in bb.model.parameters())
    assert bb.image_size == 32
    source = load(SUBSET / "test", "cifar10-subset-test")
    assert len(source) == 2000
    tset = get_dataset("cifar10-subset-test").templates  # the quickstart's: cifar-context
    head = zeroshot_head(bb, source.classnames, template_set(tset), tset, tmp_path,
                         progress=False)
    feats = extract_features(bb, source, tmp_path, batch_size=500, num_workers=0,
                             progress=False, strict=True)
    top1 = 100.0 * float(np.mean(head.logits(feats.features).argmax(1) == source.labels))
    recorded = json.loads(CKPT.with_name(CKPT.name + ".json").read_text())["zeroshot_top1"]
    assert top1 >= 35.0
    assert top1 == pytest.approx(recorded["test"], abs=0.5)


def test_training_is_reproducible():
    mod = script_module("train_tiny_clip")
    images, labels, classnames = mod.load_split(SUBSET / "pretrain", per_class=8)
    templates = mod.read_templates()
    cfg = mod.TrainConfig(batch_size=40, epochs=1, max_steps=2, warmup_steps=1, seed=3)
    runs = [mod.train(cfg, images, labels, classnames, templates, log=lambda s: None)[0]
            for _ in range(2)]
    a, b = (r.state_dict() for r in runs)
    init = mod.create_model(ARCH, seed=3)[0].state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it did train
    for k in a:
        assert torch.equal(a[k], b[k]), k
