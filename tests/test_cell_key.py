"""The cell key identifies what was computed: the weights' content, not their path."""

from __future__ import annotations

import json

import open_clip
import torch
from conftest import REPO, TINY, run_cli, same_outputs

import robench.models.backbone  # noqa: F401 (registers the tiny open_clip configs)


def _save(path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY).state_dict(), path)


def test_a_checkpoint_replaced_at_the_same_path_recomputes_its_cells(tmp_path):
    ckpt = tmp_path / "model.pt"
    _save(ckpt, 1)
    args = ("run", "suite=smoke", f"models=[{{name: m, arch: {TINY}, pretrained: {ckpt}}}]",
            "datasets=[cifar10-subset-val]", "id_dataset=null", "metrics.bootstrap=0",
            f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}", "device=cpu",
            "model.num_workers=0", "progress=false")
    assert run_cli(*args).returncode == 0
    rec = tmp_path / "r" / "smoke" / "m" / "cifar10-subset-val.json"
    first = json.loads(rec.read_text())
    (tmp_path / "keep.npz").write_bytes(rec.with_suffix(".npz").read_bytes())
    (tmp_path / "keep.json").write_text(rec.read_text())

    again = run_cli(*args)  # same file: done, nothing recomputed
    assert again.returncode == 0 and "1 of 1 cell(s) already done" in again.stdout

    _save(ckpt, 2)  # other weights, same path
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "already done" not in r.stdout
    second = json.loads(rec.read_text())
    assert second["cell_key"] != first["cell_key"]
    assert second["provenance"]["weights_hash"] != first["provenance"]["weights_hash"]
    assert not same_outputs(rec, tmp_path / "keep.json")


def _runner(tmp_path, models: str, train_root, **extra):
    from robench.config import build_config
    from robench.runner import Runner

    raw = {"name": "k", "models": models, "id_dataset": None,
           "datasets": ["cifar10-subset-val"], "cache_dir": str(tmp_path / "c"),
           "results_dir": str(tmp_path / "r"), "device": "cpu", "progress": False, **extra}
    over = [f"datasets=[cifar10-subset-val, {{name: tr, family: folder, root: {train_root}}}]"]
    return Runner(build_config(raw, over))


def test_the_key_holds_training_data_and_the_models_built_from(tmp_path):
    import shutil

    from PIL import Image

    from robench.registry import ASSETS

    train = tmp_path / "train"
    shutil.copytree(ASSETS / "cifar10-subset" / "probe", train)
    models = [{"name": "lp", "arch": TINY, "method": "linear-probe",
               "options": {"train_on": "tr", "val_on": "tr"}},
              {"name": "ft", "arch": TINY, "method": "finetune", "options": {"train_on": "tr"}},
              {"name": "w", "arch": TINY, "method": "wise-ft",
               "options": {"finetuned": "ft", "alpha": 0.5}}]
    keys = {m: _runner(tmp_path, models, train).cell_key(m, "cifar10-subset-val")
            for m in ("lp", "ft", "w")}
    assert keys == {m: _runner(tmp_path, models, train).cell_key(m, "cifar10-subset-val")
                    for m in ("lp", "ft", "w")}  # deterministic
    # strict=true does not change what a clean cell computed (a cell that skipped images is
    # refused by is_done instead: tests/test_cli.py)
    strict = _runner(tmp_path, models, train, strict=True)
    assert all(strict.cell_key(m, "cifar10-subset-val") == k for m, k in keys.items())

    # one training image changed: every model trained on it (and WiSE-FT through its fine-tuned
    # model) is a new cell; the evaluated dataset did not change
    img = sorted(train.rglob("*.jpg"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    changed = _runner(tmp_path, models, train)
    assert all(changed.cell_key(m, "cifar10-subset-val") != k for m, k in keys.items())

    # the fine-tuned model's options change WiSE-FT's cell, not the linear probe's
    models[1]["options"]["lr"] = 1e-3
    other = _runner(tmp_path, models, train)
    assert other.cell_key("w", "cifar10-subset-val") != changed.cell_key("w", "cifar10-subset-val")
    assert other.cell_key("lp", "cifar10-subset-val") == \
        changed.cell_key("lp", "cifar10-subset-val")


def test_the_key_holds_the_adaptive_bin_rule_not_the_stored_outputs(tmp_path):
    from robench.config import build_config
    from robench.runner import Runner

    def key(*over: str) -> str:
        raw = {"name": "k", "models": ["tiny-random"], "datasets": ["cifar10-subset-val"],
               "id_dataset": None, "cache_dir": str(tmp_path / "c"), "device": "cpu",
               "results_dir": str(tmp_path / "r"), "progress": False}
        return Runner(build_config(raw, list(over))).cell_key("tiny-random", "cifar10-subset-val")

    base = key()
    # the bin rule changes ece_adaptive: another cell (through the hashed metrics section)
    assert key("metrics.adaptive_bins=torch-uncertainty") != base
    assert key("metrics.adaptive_bins=robench") == base
    # outputs=logits changes what is stored beside the record, not what is computed
    assert key("outputs=logits") == base


def test_the_preprocess_block_is_part_of_the_key(tmp_path):
    """A declared preprocessing is in the key (another block: another cell), and a model
    without one keeps the key it had before blocks existed: the committed quickstart records
    are still the cells a fresh run of the suite would compute (nothing redone, the baseline
    comparable)."""
    from robench.config import build_config, load_suite
    from robench.runner import Runner

    suite = Runner(load_suite("quickstart", [f"cache_dir={tmp_path / 'c'}",
                                             f"results_dir={tmp_path / 'r'}"]))
    for m in ("tiny-clip-cifar10", "tiny-clip-linear-probe", "tiny-clip-wise-ft-a0.5"):
        rec = json.loads((REPO / "results" / "quickstart" / m / "cifar10-subset-test.json")
                         .read_text())
        assert suite.cell_key(m, "cifar10-subset-test") == rec["cell_key"], m

    def key(block: dict | None) -> str:
        model = {"name": "m", "arch": TINY, **({"preprocess": block} if block else {})}
        runner = Runner(build_config({"name": "k", "models": [model], "id_dataset": None,
                                      "datasets": ["cifar10-subset-val"],
                                      "cache_dir": str(tmp_path / "c"),
                                      "results_dir": str(tmp_path / "r"), "device": "cpu"}))
        return runner.cell_key("m", "cifar10-subset-val")

    raw = key({"size": 32})
    assert raw == key({"size": 32, "crop": None})  # the same block, written two ways
    assert len({key(None), raw, key({"size": 32, "interpolation": "bicubic"})}) == 3
