"""Zero-shot head: prompt ensemble per the CLIP paper, learned logit scale, per-class on-disk
cache (bit for bit open_clip's classifier), batched encoding."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

import robench.models.zeroshot as zs
from robench.models.zeroshot import (
    TextStore,
    class_batches,
    class_embeddings,
    encode_classes,
    prompt_budget,
    store_key,
    zeroshot_head,
)
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
    with pytest.raises(AssertionError):  # a class never seen ("cow") is encoded
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


# -- per-class cache: bit-identity with open_clip, sub-lists, batching, precision, robustness ----
NAMES = list(IMAGENET_CLASSNAMES[:48])
TEMPLATES = template_set("imagenet")[:4]


def open_clip_head(backbone, names, templates) -> np.ndarray:
    """What robench computed before per-class caching: open_clip's classifier, 10 classes per
    forward pass, at fp32."""
    with torch.no_grad():
        return build_zero_shot_classifier(backbone.model, backbone.tokenizer, names, templates,
                                          num_classes_per_batch=10, device="cpu").numpy()


class PromptCounter:
    """Wraps ``encode_text``: how many prompts reached the text encoder."""

    def __init__(self, monkeypatch, backbone) -> None:
        self.prompts = 0
        inner = backbone.model.encode_text

        def counting(tokens, *a, **k):
            self.prompts += int(tokens.shape[0])
            return inner(tokens, *a, **k)

        monkeypatch.setattr(backbone.model, "encode_text", counting)


def test_head_is_open_clips_bit_for_bit(tiny_backbone, tmp_path):
    w = class_embeddings(tiny_backbone, NAMES, TEMPLATES, tmp_path, progress=False)
    assert w.dtype == np.float32 and w.shape == (tiny_backbone.model.text_projection.shape[1], 48)
    np.testing.assert_array_equal(w, open_clip_head(tiny_backbone, NAMES, TEMPLATES))
    # and assembled from the cache (a second call encodes nothing): the same bits
    np.testing.assert_array_equal(class_embeddings(tiny_backbone, NAMES, TEMPLATES, tmp_path), w)


def test_sub_list_encodes_only_its_classes_then_full_list_reuses_them(tiny_backbone, tmp_path,
                                                                     monkeypatch):
    count = PromptCounter(monkeypatch, tiny_backbone)
    sub = NAMES[::4]
    w_sub = class_embeddings(tiny_backbone, sub, TEMPLATES, tmp_path, progress=False)
    assert count.prompts == len(sub) * len(TEMPLATES)
    count.prompts = 0
    w_full = class_embeddings(tiny_backbone, NAMES, TEMPLATES, tmp_path, progress=False)
    assert count.prompts == (len(NAMES) - len(sub)) * len(TEMPLATES)  # only the rest
    count.prompts = 0
    # bit for bit open_clip's head for each list, whichever classes were encoded together
    np.testing.assert_array_equal(w_sub, open_clip_head(tiny_backbone, sub, TEMPLATES))
    np.testing.assert_array_equal(w_full, open_clip_head(tiny_backbone, NAMES, TEMPLATES))
    np.testing.assert_array_equal(w_full[:, ::4], w_sub)
    # any other order or sub-list of known classes: assembled, nothing encoded
    order = NAMES[::-1][5:30]
    count.prompts = 0
    assembled = class_embeddings(tiny_backbone, order, TEMPLATES, tmp_path, progress=False)
    assert count.prompts == 0
    np.testing.assert_array_equal(assembled, open_clip_head(tiny_backbone, order, TEMPLATES))


def test_repeated_names_are_encoded_once(tiny_backbone, tmp_path, monkeypatch):
    count = PromptCounter(monkeypatch, tiny_backbone)
    names = ["missile", "cat", "missile"]  # open_clip's ImageNet names repeat two classes
    w = class_embeddings(tiny_backbone, names, ["a photo of a {}."], tmp_path, progress=False)
    assert count.prompts == 2
    np.testing.assert_array_equal(w[:, 0], w[:, 2])


def test_batch_composition_does_not_change_the_vectors(tiny_backbone):
    """At fp32 on CPU a prompt's embedding does not depend on the other prompts of its forward
    pass (batches of >= 12 prompts; this machine's BLAS picks other kernels below that), so the
    prompt budget can change without changing a cached vector."""
    ref = encode_classes(tiny_backbone, NAMES, TEMPLATES, progress=False, max_prompts=10_000)
    for budget in (16, 40, 80, 100):  # 4, 10, 20 and 25 classes per pass
        assert len(class_batches(NAMES, len(TEMPLATES), budget)) == -(-48 // (budget // 4))
        np.testing.assert_array_equal(
            encode_classes(tiny_backbone, NAMES, TEMPLATES, progress=False, max_prompts=budget),
            ref)
    # a class never straddles two forward passes, and the budget never drops below one class
    assert class_batches(["a", "b", "c"], 80, 100) == [["a"], ["b"], ["c"]]


def test_prompt_budget_is_bounded_by_memory(tiny_backbone):
    budget = prompt_budget(tiny_backbone)
    assert 1 <= budget <= zs.MAX_PROMPTS
    ctx, width = zs._text_shape(tiny_backbone.model)
    assert (ctx, width) == (20, 32)  # robench-tiny-vit's text tower
    assert budget == min(zs.MAX_PROMPTS,
                         zs.CPU_ACTIVATION_BYTES // (zs.ACTIVATION_FLOATS * ctx * width * 4))


def test_precision_is_part_of_the_key(tiny_backbone, tmp_path, monkeypatch):
    fp32 = class_embeddings(tiny_backbone, NAMES[:4], TEMPLATES, tmp_path, progress=False)
    bf16 = replace(tiny_backbone, precision="bf16")
    assert store_key(bf16, TEMPLATES) != store_key(tiny_backbone, TEMPLATES)
    count = PromptCounter(monkeypatch, tiny_backbone)
    low = class_embeddings(bf16, NAMES[:4], TEMPLATES, tmp_path, progress=False)
    assert count.prompts == 16  # encoded again, under bf16 autocast
    assert low.dtype == np.float32 and not np.array_equal(low, fp32)
    np.testing.assert_allclose(low, fp32, atol=0.05)
    # the template order is part of the key too (the mean's rounding depends on it)
    assert store_key(tiny_backbone, TEMPLATES[::-1]) != store_key(tiny_backbone, TEMPLATES)
    folders = sorted(p.name for p in (tmp_path / "text").iterdir())
    assert folders == sorted([store_key(tiny_backbone, TEMPLATES), store_key(bf16, TEMPLATES)])
    meta = json.loads((tmp_path / "text" / folders[0] / "meta.json").read_text())
    assert meta["templates"] == TEMPLATES and meta["precision"] in ("fp32", "bf16")


def test_progress_bar_counts_prompts(tiny_backbone, tmp_path, capsys, monkeypatch):
    import robench.progress

    monkeypatch.setattr(robench.progress, "is_tty", lambda stream=None: True)  # a terminal
    class_embeddings(tiny_backbone, NAMES[:6], TEMPLATES, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "text head: 6 classes x 4 templates" in err and "/24 " in err and "prompt/s" in err
    monkeypatch.undo()  # a pipe: one line when done
    class_embeddings(tiny_backbone, NAMES[6:8], TEMPLATES, tmp_path, progress=True)
    assert capsys.readouterr().err.startswith("text head: 2 classes x 4 templates: 8 prompt in")
    class_embeddings(tiny_backbone, NAMES[8:9], TEMPLATES, tmp_path, progress=False)
    with robench.progress.verbosity_level("quiet"):
        class_embeddings(tiny_backbone, NAMES[9:10], TEMPLATES, tmp_path, progress=True)
    class_embeddings(tiny_backbone, NAMES[:10], TEMPLATES, tmp_path, progress=True)  # cached
    assert capsys.readouterr().err == ""


def test_interrupted_write_leaves_nothing_behind(tiny_backbone, tmp_path, monkeypatch):
    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="No space left"):
        class_embeddings(tiny_backbone, NAMES[:3], TEMPLATES, tmp_path, progress=False)
    monkeypatch.undo()
    folder = tmp_path / "text" / store_key(tiny_backbone, TEMPLATES)
    # no shard, no temporary file (meta.json and its checksum only)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "meta.json.sha256"]
    w = class_embeddings(tiny_backbone, NAMES[:3], TEMPLATES, tmp_path, progress=False)
    np.testing.assert_array_equal(w, open_clip_head(tiny_backbone, NAMES[:3], TEMPLATES))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape"])
def test_damaged_shard_is_discarded_and_encoded_again(tiny_backbone, tmp_path, caplog, damage):
    w = class_embeddings(tiny_backbone, NAMES[:8], TEMPLATES, tmp_path, progress=False)
    store = TextStore.for_backbone(tmp_path, tiny_backbone, TEMPLATES)
    (shard,) = store.shards()
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:300])
    elif damage == "garbage":
        shard.write_bytes(b"\x00" * 64)
    else:
        np.savez(shard, names=np.asarray(NAMES[:8]), vectors=np.zeros((3, 4), np.float32))
    again = class_embeddings(tiny_backbone, NAMES[:8], TEMPLATES, tmp_path, progress=False)
    np.testing.assert_array_equal(again, w)
    assert "text cache: shard" in caplog.text and "its classes are encoded again" in caplog.text
    assert len(store.shards()) == 1 and len(store.load()) == 8


def test_many_shards_are_merged_and_concurrent_duplicates_are_harmless(tiny_backbone, tmp_path):
    ref = class_embeddings(tiny_backbone, NAMES, TEMPLATES, tmp_path / "ref", progress=False)
    for i in range(0, 24, 2):  # 12 runs, each meeting 2 new classes
        class_embeddings(tiny_backbone, NAMES[i:i + 2], TEMPLATES, tmp_path, progress=False)
    store = TextStore.for_backbone(tmp_path, tiny_backbone, TEMPLATES)
    assert 1 <= len(store.shards()) <= zs.MAX_SHARDS
    assert sorted(store.load()) == sorted(NAMES[:24])
    # two runs that encoded the same classes at once: both shards stay, every class loads once
    other = TextStore(store.folder)
    other.add(NAMES[20:30], ref[:, 20:30].T)
    store.add(NAMES[25:35], ref[:, 25:35].T)
    got = class_embeddings(tiny_backbone, NAMES, TEMPLATES, tmp_path, progress=False)
    np.testing.assert_array_equal(got, ref)


def test_head_over_a_scored_sub_list(tiny_backbone, tmp_path, monkeypatch):
    """ImageNet-R/-A style: the head carries only the scored classes (only they are encoded),
    and a cell scored through it stores exactly the outputs of the full head restricted to
    them -- the cell's own outputs and its ID pairing alike."""
    from robench.data.base import ImageSource
    from robench.errors import RobenchError
    from robench.features import FeatureSet
    from robench.scoring import cell_outputs, id_confidence

    subset = [1, 5, 6, 20, 33, 47]
    rng = np.random.default_rng(0)
    source = ImageSource("r", np.asarray(subset * 3), NAMES, "m", None, class_subset=subset)
    full = zeroshot_head(tiny_backbone, NAMES, TEMPLATES, "imagenet", tmp_path / "a", False)
    count = PromptCounter(monkeypatch, tiny_backbone)
    sub = zeroshot_head(tiny_backbone, NAMES, TEMPLATES, "imagenet", tmp_path / "b", False,
                        columns=subset)
    assert count.prompts == len(subset) * len(TEMPLATES)
    assert sub.columns == subset and sub.weight.shape[1] == 6 and sub.classnames == NAMES
    np.testing.assert_array_equal(sub.weight, full.weight[:, subset])
    feats = FeatureSet(rng.normal(size=(18, full.weight.shape[0])).astype(np.float16), [], "k",
                       False)
    got, want = cell_outputs(sub, feats, source), cell_outputs(full, feats, source)
    for g, e in zip(got.samples, want.samples, strict=True):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(got.scored_classes, subset)
    id_src = ImageSource("val", np.arange(48) % 48, NAMES, "m", None)
    id_feats = FeatureSet(rng.normal(size=(48, full.weight.shape[0])).astype(np.float16), [],
                          "i", False)
    for a, b in zip(id_confidence(sub, id_feats, id_src, got.scored_classes),
                    id_confidence(full, id_feats, id_src, want.scored_classes), strict=True):
        np.testing.assert_array_equal(a, b)  # MSP and correctness alike
    # restricted() picks labels from wherever they sit among the head's columns
    np.testing.assert_array_equal(sub.restricted([33, 1]).weight, full.weight[:, [33, 1]])
    assert sub.restricted([33, 1]).classnames == [NAMES[33], NAMES[1]]
    assert sub.can_score(subset) and sub.can_score(subset[:3]) and not sub.can_score(None)
    assert full.can_score(None) and full.restricted(None) is full
    with pytest.raises(RobenchError, match="not for 1 that are scored here"):
        cell_outputs(sub, FeatureSet(feats.features[:1], [], "k", False),
                     ImageSource("a", np.asarray([2]), NAMES, "m", None, class_subset=[2, 5]))
    with pytest.raises(RobenchError, match="the head has columns for 6 classes"):
        cell_outputs(sub, FeatureSet(feats.features[:1], [], "k", False),
                     ImageSource("val", np.asarray([0]), NAMES, "m", None))


def test_empty_class_list_or_templates_is_a_robench_error(tiny_backbone, tmp_path):
    from robench.errors import RobenchError

    with pytest.raises(RobenchError, match="needs class names and templates"):
        class_embeddings(tiny_backbone, [], TEMPLATES, tmp_path)
    with pytest.raises(RobenchError, match="0 templates"):
        class_embeddings(tiny_backbone, ["cat"], [], tmp_path)


def test_tokenising_ahead_keeps_order_and_bits(tiny_backbone, monkeypatch):
    """The accelerator path tokenises the next batch in a thread: same batches, same order."""
    assert list(zs._prefetched(str, range(7), True)) == [str(i) for i in range(7)]
    assert list(zs._prefetched(str, [], True)) == []
    ref = encode_classes(tiny_backbone, NAMES, TEMPLATES, progress=False, max_prompts=40)
    inner = zs._prefetched
    monkeypatch.setattr(zs, "_prefetched", lambda fn, items, background: inner(fn, items, True))
    np.testing.assert_array_equal(
        encode_classes(tiny_backbone, NAMES, TEMPLATES, progress=False, max_prompts=40), ref)


def test_batched_head_is_bit_identical_to_open_clip_and_progress_counts_prompts(
        tiny_backbone, tmp_path, capsys):
    """230 classes x 2 templates go through the text encoder in one forward pass (open_clip:
    23 passes of 10 classes); the vectors are bit-identical, and the progress (not a TTY here:
    one line, no bar frames) counts prompts."""
    names = [f"class {i}" for i in range(230)]
    templates = ["a photo of a {}.", "a {}."]
    w = class_embeddings(tiny_backbone, names, templates, tmp_path, progress=True)
    np.testing.assert_array_equal(w, open_clip_head(tiny_backbone, names, templates))
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("text head: 230 classes x 2 templates: 460 prompt in "), err
