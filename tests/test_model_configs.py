"""A user's own open_clip architectures: model_configs in a suite, $ROBENCH_MODEL_CONFIGS, and
what a local-dir: folder must hold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import open_clip
import pytest
from conftest import TINY, run_cli

from robench.errors import RobenchError
from robench.models import arch_configs as A
from robench.models import backbone as B

SUITE = """
{configs}
models: [{{name: mine, arch: {arch}, pretrained: null}}]
datasets: [cifar10-subset-val]
id_dataset: null
model: {{batch_size: 250, num_workers: 0}}
metrics: {{bootstrap: 0}}
"""


def write_arch(folder, name: str, **changes) -> dict:
    """A copy of robench's tiny ViT config with some fields changed, as ``folder/<name>.json``."""
    cfg = json.loads((B.CONFIG_DIR / f"{TINY}.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    return cfg


def _run(tmp_path, suite, env=None):
    return run_cli("run", f"suite={suite}", f"cache_dir={tmp_path / 'cache'}",
                   f"results_dir={tmp_path / 'results'}", "device=cpu", "progress=false", env=env)


def _feature_widths(cache) -> set[int]:
    return {np.load(p, mmap_mode="r").shape[1] for p in (cache / "features").glob("*.npy")}


def test_suite_model_configs_relative_to_the_suite_file(tmp_path):
    write_arch(tmp_path / "my_configs", "suite-tiny-wide", embed_dim=48, vision_cfg__width=96)
    suite = tmp_path / "custom.yaml"
    suite.write_text(SUITE.format(configs="model_configs: [./my_configs]", arch="suite-tiny-wide"))
    # run from another folder: the path is the suite file's, not the working directory's
    r = run_cli("run", f"suite={suite}", f"cache_dir={tmp_path / 'cache'}",
                f"results_dir={tmp_path / 'results'}", "device=cpu", "progress=false",
                cwd=B.CONFIG_DIR)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "results" / "custom" / "mine" / "cifar10-subset-val.json")
                     .read_text())
    assert rec["provenance"]["arch"] == "suite-tiny-wide" and rec["metrics"]["n"] == 500
    assert _feature_widths(tmp_path / "cache") == {48}  # the registered architecture was built


def test_env_model_configs_and_the_error_without_them(tmp_path):
    folder = tmp_path / "elsewhere"
    write_arch(folder, "env-tiny-deep", vision_cfg__layers=3, embed_dim=40)
    suite = tmp_path / "envsuite.yaml"
    suite.write_text(SUITE.format(configs="", arch="env-tiny-deep"))

    r = _run(tmp_path, suite)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown open_clip architecture 'env-tiny-deep'" in r.stderr
    for how in ("model_configs", "ROBENCH_MODEL_CONFIGS", "local-dir:"):
        assert how in r.stderr, how
    listed = r.stderr.split("architectures: ")[1].split("\n")[0]
    assert listed.count(",") == 5 and "in all)" in listed  # the closest 5, not ~150 names

    missing = tmp_path / "nowhere"
    r = _run(tmp_path, suite, env={"ROBENCH_MODEL_CONFIGS": f"{missing}:{folder}"})
    assert r.returncode == 2 and f"{missing}" in r.stderr and "does not exist" in r.stderr

    r = _run(tmp_path, suite, env={"ROBENCH_MODEL_CONFIGS": f"{folder / 'env-tiny-deep.json'}"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results" / "envsuite" / "mine" / "cifar10-subset-val.json").is_file()
    assert _feature_widths(tmp_path / "cache") == {40}


def test_register_refuses_what_open_clip_would_skip_or_shadow(tmp_path):
    with pytest.raises(RobenchError, match="does not exist"):
        A.register_model_configs([tmp_path / "absent"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RobenchError, match="holds no .json"):
        A.register_model_configs([tmp_path / "empty"])
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "half.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(RobenchError, match="lacks vision_cfg, text_cfg"):
        A.register_model_configs([tmp_path / "partial"])
    (tmp_path / "wrapped").mkdir()
    (tmp_path / "wrapped" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(RobenchError, match="local-dir config"):
        A.register_model_configs([tmp_path / "wrapped"])
    write_arch(tmp_path / "shadow", "ViT-B-32")
    with pytest.raises(RobenchError, match="already a different open_clip architecture"):
        A.register_model_configs([tmp_path / "shadow"])
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512  # untouched
    same = tmp_path / "same"
    same.mkdir()
    shutil.copyfile(B.CONFIG_DIR / f"{TINY}.json", same / f"{TINY}.json")
    assert A.register_model_configs([same]) == [TINY]  # identical content: harmless


def test_unknown_architecture_lists_only_the_closest_names():
    with pytest.raises(RobenchError) as e:
        B.load_backbone("ViT-B-3", None, device="cpu", allow_download=True)
    msg = str(e.value)
    assert "Did you mean 'ViT-B-32'" in msg and "in all)" in msg
    assert msg.count("ViT-") < 10 and "model_configs" in msg


def test_architecture_config_is_part_of_the_backbone_identity(tmp_path):
    """Two configs that differ only in the activation build identical weights; their features
    differ, so the feature cache must tell them apart."""
    write_arch(tmp_path, "ident-gelu")
    write_arch(tmp_path, "ident-quick", quick_gelu=True)
    A.register_model_configs([tmp_path])
    a = B.load_backbone("ident-gelu", None, device="cpu", seed=5)
    b = B.load_backbone("ident-quick", None, device="cpu", seed=5)
    assert a.weights_hash == b.weights_hash
    assert a.id() != b.id()


def test_local_dir_must_hold_model_cfg_and_weights(tmp_path, tiny_local_dir):
    bare = tmp_path / "noweights"
    bare.mkdir()
    shutil.copyfile(tiny_local_dir / "open_clip_config.json", bare / "open_clip_config.json")
    with pytest.raises(RobenchError, match="no weights file"):
        B.load_backbone(TINY, f"local-dir:{bare}", device="cpu")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copyfile(B.CONFIG_DIR / f"{TINY}.json", flat / "open_clip_config.json")
    shutil.copyfile(tiny_local_dir / "open_clip_pytorch_model.bin",
                    flat / "open_clip_pytorch_model.bin")
    with pytest.raises(RobenchError, match='no "model_cfg" dict'):
        B.load_backbone(TINY, f"local-dir:{flat}", device="cpu")
