"""Zero-shot text head, cold: robench's batched per-class encoding (fresh cache every round) vs
open_clip's ``build_zero_shot_classifier`` as robench called it before (10 classes per forward
pass) and CLIP_benchmark's loop (one class per forward pass), for 200 ImageNet classes x 80
templates on the shipped tiny CLIP. Same model, prompts, precision (fp32) and threads.

Run with ``pytest tests/benchmarks/test_bench_text_head.py --benchmark-enable``; compare the rows'
means (all three compute the same head: the test checks it, bit for bit for open_clip's).
Whole-command timings against CLIP_benchmark itself: ``scripts/bench_vs_clip_benchmark.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from robench.models.backbone import load_backbone
from robench.models.zeroshot import class_embeddings
from robench.registry import template_set

NAMES = list(IMAGENET_CLASSNAMES[:200])
TEMPLATES = template_set("imagenet")


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("robench-tiny-clip", "assets:models/robench-tiny-clip-cifar10.pt", "cpu")


@pytest.fixture(scope="module")
def reference(backbone) -> np.ndarray:
    with torch.no_grad():
        return build_zero_shot_classifier(backbone.model, backbone.tokenizer, NAMES, TEMPLATES,
                                          num_classes_per_batch=10, device="cpu").numpy()


def test_open_clip_10_classes_per_pass(benchmark, backbone, reference):
    def run():
        with torch.no_grad():
            return build_zero_shot_classifier(backbone.model, backbone.tokenizer, NAMES,
                                              TEMPLATES, num_classes_per_batch=10, device="cpu")

    w = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(w.numpy(), reference)
    benchmark.extra_info["prompts"] = len(NAMES) * len(TEMPLATES)


def test_clip_benchmark_style_one_class_per_pass(benchmark, backbone, reference):
    def run():  # CLIP_benchmark's zero_shot_classifier loop, fp32
        cols = []
        with torch.no_grad():
            for name in NAMES:
                e = backbone.model.encode_text(backbone.tokenizer([t.format(name)
                                                                   for t in TEMPLATES]))
                e = torch.nn.functional.normalize(e, dim=-1).mean(dim=0)
                cols.append(e / e.norm())
        return torch.stack(cols, dim=1)

    w = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_allclose(w.numpy(), reference, atol=1e-5)
    benchmark.extra_info["prompts"] = len(NAMES) * len(TEMPLATES)


def test_robench_cold(benchmark, backbone, reference, tmp_path):
    counter = iter(range(100))

    def run():  # a fresh cache dir per round: measure encoding, not the cache hit
        return class_embeddings(backbone, NAMES, TEMPLATES, tmp_path / str(next(counter)),
                                progress=False)

    w = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    np.testing.assert_array_equal(w, reference)
    benchmark.extra_info["prompts"] = len(NAMES) * len(TEMPLATES)
