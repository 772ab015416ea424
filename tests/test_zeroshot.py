"""Zero-shot head: prompt ensemble per the CLIP paper, learned logit scale, on-disk cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robench.models.zeroshot import class_embeddings, zeroshot_head
from robench.registry import template_set


def test_template_sets():
    cifar = template_set("cifar")
    assert len(cifar) == 18 and all(t.count("{}") == 1 for t in cifar)
    imnet = template_set("imagenet")
    assert len(imnet) == 80 and imnet[0].format("dog") != imnet[1].format("dog")


def test_prompt_ensemble_matches_definition(tiny_backbone, tmp_path):
    names, templates = ["cat", "dog", "sea lion"], ["a photo of a {}.", "a {} in the wild."]
    w = class_embeddings(tiny_backbone, names, templates, tmp_path, progress=False)
    with torch.no_grad():
        for c, name in enumerate(names):
            tok = tiny_backbone.tokenizer([t.format(name) for t in templates])
            e = torch.nn.functional.normalize(tiny_backbone.model.encode_text(tok), dim=-1)
            ref = torch.nn.functional.normalize(e.mean(0), dim=0).numpy()
            np.testing.assert_allclose(w[:, c], ref, atol=1e-5)


def test_cache_reused_and_keyed(tiny_backbone, tmp_path, monkeypatch):
    names, templates = ["cat", "dog"], ["a photo of a {}."]
    w = class_embeddings(tiny_backbone, names, templates, tmp_path, progress=False)

    def boom(*a, **k):
        raise AssertionError("text encoder called despite cache")

    monkeypatch.setattr(tiny_backbone.model, "encode_text", boom)
    np.testing.assert_array_equal(class_embeddings(tiny_backbone, names, templates, tmp_path), w)
    with pytest.raises(AssertionError):  # other class names -> other key -> recompute
        class_embeddings(tiny_backbone, ["cat", "cow"], templates, tmp_path)


def test_logit_scale_is_the_models_own(tiny_backbone, tmp_path):
    with torch.no_grad():
        old = tiny_backbone.model.logit_scale.clone()
        tiny_backbone.model.logit_scale.fill_(math.log(50.0))
    try:
        head = zeroshot_head(tiny_backbone, ["a", "b"], ["{}"], "custom", tmp_path, False)
        assert head.scale == pytest.approx(50.0, rel=1e-5)
        f = np.eye(head.weight.shape[0], dtype=np.float16)[:3]
        np.testing.assert_allclose(head.logits(f), 50.0 * f.astype(np.float32) @ head.weight,
                                   rtol=1e-5)
        assert head.info["logit_scale"] == pytest.approx(50.0, rel=1e-5)
    finally:
        with torch.no_grad():
            tiny_backbone.model.logit_scale.copy_(old)


def test_text_head_in_blocks_is_bit_identical_to_one_open_clip_call(tiny_backbone, tmp_path,
                                                                    capsys):
    """robench calls open_clip on whole multiples of 10 classes (to report progress); the batches
    are the same, so the embeddings are bit-identical to a single call."""
    from open_clip import build_zero_shot_classifier

    names = [f"class {i}" for i in range(230)]  # 230 classes: blocks of 30 (23 batches of 10)
    templates = ["a photo of a {}.", "a {}."]
    w = class_embeddings(tiny_backbone, names, templates, tmp_path, progress=True)
    with torch.no_grad():
        ref = build_zero_shot_classifier(tiny_backbone.model, tokenizer=tiny_backbone.tokenizer,
                                         classnames=names, templates=templates,
                                         num_classes_per_batch=10, device="cpu")
    assert np.array_equal(w, ref.float().numpy())
    err = capsys.readouterr().err  # not a TTY here: one line, no bar frames
    assert err.count("\n") == 1 and err.startswith("text head (2 templates): 230 class in ")
