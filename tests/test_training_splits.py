"""Methods never train, select or calibrate on an evaluated split unless told to."""

from __future__ import annotations

import pytest
from conftest import run_cli

from robench.registry import ASSETS, DATASETS

LP = "{train_on: cifar10-subset-probe, val_on: cifar10-subset-val}"
CASES = {
    # evaluated by name: the probe selects its C on the evaluated split
    "val_on": (f"[{{name: lp, arch: robench-tiny-vit, method: linear-probe, options: {LP}}}]",
               "[cifar10-subset-val]", "val_on=cifar10-subset-val is one of the datasets"),
    # the same files under another name
    "same-files": (
        "[{name: ts, arch: robench-tiny-vit, method: temperature-scaling, "
        "options: {base: zeroshot, calibrate_on: cifar10-subset-val}}]",
        f"[{{name: my-val, family: folder, root: {ASSETS / 'cifar10-subset' / 'val'}}}]",
        "calibrate_on=cifar10-subset-val has the same files as my-val"),
    # through WiSE-FT's fine-tuned model
    "wise-ft": (
        "[{name: w, arch: robench-tiny-vit, method: wise-ft, options: {finetuned: ft, "
        "alpha: 0.5}}, {name: ft, arch: robench-tiny-vit, method: finetune, "
        "options: {train_on: cifar10-subset-val}}]",
        "[cifar10-subset-val]", "model w: ft.train_on=cifar10-subset-val"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_on_an_evaluated_split_is_refused_before_any_work(tmp_path, case):
    models, datasets, message = CASES[case]
    r = run_cli("run", "suite=smoke", f"models={models}", f"datasets={datasets}",
                "id_dataset=null", f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}",
                "device=cpu", "progress=false")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "allow_train_on_eval=true" in r.stderr
    assert "Traceback" not in r.stderr
    # nothing was computed (only the file-content index of the datasets was read or written)
    assert not any((tmp_path / "c" / k).exists() for k in ("features", "artifacts", "text"))


def test_the_override_runs_it_deliberately(tmp_path):
    models, datasets, _ = CASES["val_on"]
    r = run_cli("run", "suite=smoke", f"models={models}", f"datasets={datasets}",
                "id_dataset=null", "allow_train_on_eval=true", "metrics.bootstrap=0",
                f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}", "device=cpu",
                "model.num_workers=0", "progress=false")
    assert r.returncode == 0, r.stderr[-2000:]


def test_imagenet_train_is_registered_with_the_val_label_rule():
    spec = DATASETS["imagenet-train"]
    assert spec.family == DATASETS["imagenet"].family == "imagenet-folder"
    assert spec.n_expected == 1_281_167 and spec.root == "imagenet/train"


@pytest.mark.parametrize("override", [
    "models=[{name: ../../../x, arch: robench-tiny-vit}]",
    "models=[{name: /tmp/abs, arch: robench-tiny-vit}]",
    "datasets=[{name: a/b, family: folder, root: /nowhere}]",
    "name=../escape",
])
def test_names_that_would_leave_results_dir_are_refused(tmp_path, override):
    r = run_cli("run", "suite=smoke", override, "id_dataset=null",
                f"cache_dir={tmp_path / 'c'}", f"results_dir={tmp_path / 'r'}", "device=cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot be used" in r.stderr and "rename the" in r.stderr
    assert not list(tmp_path.rglob("*.json"))  # refused before any record was written
