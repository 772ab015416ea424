"""open_clip loading paths (file, local-dir:, hf-hub: from the cache, tags), device, precision."""

from __future__ import annotations

import shutil

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY

from robench.errors import RobenchError
from robench.models import backbone as B


def _feats(bb, n=4):
    torch.manual_seed(0)
    x = torch.rand(n, 3, bb.image_size, bb.image_size)
    return bb.encode_images(x).numpy()


def test_load_from_file_matches_in_memory(tiny_backbone, tiny_checkpoint):
    bb = B.load_backbone(TINY, str(tiny_checkpoint), device="cpu")
    assert bb.weights_hash == tiny_backbone.weights_hash
    np.testing.assert_allclose(_feats(bb), _feats(tiny_backbone), atol=1e-6)
    f = _feats(bb)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


def test_random_init_is_seeded():
    a = B.load_backbone(TINY, None, device="cpu", seed=1)
    b = B.load_backbone(TINY, None, device="cpu", seed=1)
    c = B.load_backbone(TINY, None, device="cpu", seed=2)
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_local_dir_uses_its_own_preprocessing(tiny_backbone, tiny_local_dir):
    bb = B.load_backbone(TINY, f"local-dir:{tiny_local_dir}", device="cpu")
    assert bb.weights_hash == tiny_backbone.weights_hash
    assert "mean=[0.5, 0.5, 0.5]" in bb.preprocess_id
    assert bb.preprocess_id != tiny_backbone.preprocess_id


def test_hf_hub_from_local_cache(tmp_path, monkeypatch, tiny_backbone, tiny_local_dir):
    """A hub repo already in the HF cache loads offline; a missing one fails fast."""
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--robench--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in tiny_local_dir.iterdir():
        shutil.copyfile(f, snap / f.name)
    (tmp_path / "hub" / "models--robench--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--robench--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    bb = B.load_backbone(TINY, "hf-hub:robench/tiny", device="cpu")
    assert bb.weights_hash == tiny_backbone.weights_hash
    with pytest.raises(RobenchError, match="not in the local cache"):
        B.load_backbone(TINY, "hf-hub:robench/absent", device="cpu")


def test_uncached_tag_fails_fast_before_open_clip(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))

    def boom(*a, **k):
        raise AssertionError("open_clip must not be asked to download")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    with pytest.raises(RobenchError) as e:
        B.load_backbone("ViT-B-32", "openai", device="cpu")
    msg = str(e.value)
    assert "not in the local cache" in msg and "pretrained=/path/to/weights.pt" in msg
    assert "local-dir:" in msg


def test_unknown_arch_and_tag():
    with pytest.raises(RobenchError, match="Did you mean 'ViT-B-32'"):
        B.load_backbone("ViT-B-3", None, device="cpu")
    with pytest.raises(RobenchError) as e:
        B.load_backbone("ViT-B-32", "opena1", device="cpu")
    assert "Did you mean 'openai'" in str(e.value)
    with pytest.raises(RobenchError, match="open_clip_config.json"):
        B.load_backbone(TINY, "local-dir:/nonexistent", device="cpu")


def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert B.resolve_device("auto") in ("cpu", "mps")
    with pytest.raises(RobenchError, match="CUDA is not available"):
        B.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert B.resolve_device("auto") == "cuda"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_autocast(tiny_backbone, precision):
    bb = B.Backbone(**{**tiny_backbone.__dict__, "precision": precision})
    f = _feats(bb)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, _feats(tiny_backbone), atol=0.05)
    assert bb.id() != tiny_backbone.id()  # precision is part of the feature cache key


def test_light_config_reader_agrees_with_open_clip(tmp_path):
    """Cell keys hold the architecture config; a run with every cell done reads it without
    importing open_clip (robench.models.weights), so both readers must give the same dicts."""
    import json
    import subprocess
    import sys

    import open_clip

    from robench.models import weights

    configs = weights.model_configs()
    assert set(configs) == set(open_clip.list_models())
    for name in open_clip.list_models():
        assert configs[name] == open_clip.get_model_config(name), name
    code = ("import json, sys; from robench.models.weights import model_config; "
            "print(json.dumps(model_config(sys.argv[1]))); "
            "assert 'open_clip' not in sys.modules and 'torch' not in sys.modules")
    for arch in ("ViT-B-32", "robench-tiny-clip", "ViT-B-16-quickgelu"):
        out = subprocess.run([sys.executable, "-c", code, arch], capture_output=True, text=True,
                             check=True)
        assert json.loads(out.stdout) == open_clip.get_model_config(arch)
    assert weights.model_config("timm:resnet50") is None
    assert weights.model_config("no-such-arch") is None
