"""The cell key identifies what was computed: the weights' content, not their path."""

from __future__ import annotations

import json

import open_clip
import torch
from conftest import TINY, run_cli, same_outputs

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
