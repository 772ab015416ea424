"""The CLI end to end, in subprocesses, as a user runs it: runs, resume, force, errors, lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, run_cli, write_cifar10

SUITE = """
models: [tiny-random, {{name: tiny-file, arch: robench-tiny-vit, pretrained: {ckpt}}}]
datasets: [cifar10, cifar10-subset-val]
id_dataset: cifar10
data_root: {data}
model: {{batch_size: 32, num_workers: 0}}
metrics: {{bootstrap: 50}}
"""


@pytest.fixture()
def suite(tmp_path, tiny_checkpoint):
    write_cifar10(tmp_path / "data" / "cifar10", n_test=60)
    p = tmp_path / "mini.yaml"
    p.write_text(SUITE.format(ckpt=tiny_checkpoint, data=tmp_path / "data"))
    return p


def _args(tmp_path, suite, *extra):
    return ("run", f"suite={suite}", f"cache_dir={tmp_path / 'cache'}",
            f"results_dir={tmp_path / 'results'}", "device=cpu", *extra)


def test_run_writes_records_then_resumes_without_decoding(tmp_path, suite):
    r = run_cli(*_args(tmp_path, suite))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "results" / "mini"
    recs = sorted(p for p in out.rglob("*.json") if p.name != "analysis.json")
    assert len(recs) == 4
    # beside the records: the suite's cross-cell analysis (robench.analysis), not a record
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["kind"] == "robench-analysis" and len(analysis["inputs"]) == 4
    rec = json.loads((out / "tiny-file" / "cifar10.json").read_text())
    assert rec["model"] == "tiny-file" and rec["dataset"] == "cifar10"
    for key in ("acc1", "acc1_ci_low", "acc1_ci_high", "acc5", "ece", "ece_ci_low",
                "max_cal_err",
                "ece_adaptive", "nll", "brier", "auroc", "auroc_ci_low", "aupr_err", "fpr95"):
        assert key in rec["metrics"], key
    assert rec["metrics"]["n"] == 60
    prov = rec["provenance"]
    for key in ("robench", "torch", "open_clip", "git_sha", "device", "dtype", "batch_size",
                "seed", "weights_hash", "logit_scale"):
        assert key in prov, key
    assert rec["protocol"]["template_set"] == "cifar" and rec["protocol"]["n_templates"] == 18
    assert rec["data"]["manifest_hash"]
    val = json.loads((out / "tiny-file" / "cifar10-subset-val.json").read_text())
    assert 0.0 <= val["metrics"]["ood_auroc"] <= 1.0  # paired with id_dataset=cifar10
    assert "mce" not in rec["metrics"]  # renamed: not ImageNet-C's mean Corruption Error
    with np.load(out / "tiny-file" / "cifar10.npz") as z:
        assert z["topk_class"].shape == (60, 5) and z["label"].shape == (60,)
        assert z["log_norm"].dtype == np.float64
        assert "sample_id" not in z.files  # a pickled CIFAR split: the row index is the id
        assert "probs" not in z.files  # no float16 probabilities any more
    assert "tiny-file" in r.stdout and "acc1" in r.stdout  # the printed table
    header = next(line for line in r.stdout.splitlines() if line.startswith("metric"))
    assert header.split()[1:] == ["acc1", "acc5", "ece", "auroc"] * 2 + ["ood_auroc"]

    mtimes = {p: p.stat().st_mtime_ns for p in recs}
    time.sleep(0.05)
    (out / "tiny-random" / "cifar10.json").unlink()  # as if the run had crashed there
    r2 = run_cli(*_args(tmp_path, suite, "progress=false"))
    assert r2.returncode == 0, r2.stderr
    assert "already done" in r2.stdout
    assert "features" not in r2.stderr  # no image decoded: features came from the cache
    for p, m in mtimes.items():
        if p.name != "cifar10.json" or p.parent.name != "tiny-random":
            assert p.stat().st_mtime_ns == m, f"{p} was recomputed"
    assert (out / "tiny-random" / "cifar10.json").is_file()

    # every cell done: the run only checks records, and imports neither torch nor open_clip
    code = ("import sys; from robench.cli import main; rc = main(sys.argv[1:]); print('HEAVY', "
            "sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)); "
            "sys.exit(rc)")
    warm = subprocess.run([sys.executable, "-c", code, *_args(tmp_path, suite)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert "4 of 4 cell(s) already done" in warm.stdout and "HEAVY []" in warm.stdout
    for p, m in mtimes.items():
        if p.name != "cifar10.json" or p.parent.name != "tiny-random":
            assert p.stat().st_mtime_ns == m, f"{p} was recomputed"

    r3 = run_cli(*_args(tmp_path, suite, "force=true", "progress=false"))
    assert r3.returncode == 0, r3.stderr
    assert all(p.stat().st_mtime_ns != m for p, m in mtimes.items())

    res = run_cli("results", "--dir", str(out), "--format", "csv")
    # header, 4 cells, then per model its avg shift acc1 (cifar10-subset-val; cifar10 is the ID)
    assert res.returncode == 0 and res.stdout.count("\n") == 1 + 4 + 2
    assert res.stdout.count(",avg shift,") == 2
    table = run_cli("results", "--dir", str(out))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["model", "dataset", "n", "acc1", "acc5",
                                                    "ece", "auroc", "ood_auroc"]


def test_missing_dataset_root_fails_before_model_load(tmp_path, suite):
    r = run_cli(*_args(tmp_path, suite, f"data.cifar10.root={tmp_path / 'nope'}"))
    assert r.returncode == 2
    assert "cifar10 not found" in r.stderr and "robench data download cifar10" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()  # no model was loaded, nothing was extracted


@pytest.mark.parametrize(("args", "needle"), [
    (("run", "suite=smokey"), "Did you mean 'smoke'"),
    (("run", "suite=smoke", "modle.batch_size=3"), "Did you mean 'model"),
    (("run", "suite=smoke", "datasets=[cifar-10]"), "Did you mean 'cifar10'"),
    (("run", "suite=smoke", "models=[clip-vit-b32-opena]"), "Did you mean 'clip-vit-b32-openai'"),
    (("run", "suite=smoke", "model.batch_size"), "expected key=value"),
    (("run", "suite=smoke", "models=[clip-vit-b32-openai]", "datasets=[cifar10-subset-test]"),
     "not in the local cache"),
])
def test_cli_errors(tmp_path, args, needle):
    r = run_cli(*args, f"cache_dir={tmp_path}/c", f"results_dir={tmp_path}/r")
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_list_commands():
    models = run_cli("list", "models")
    assert models.returncode == 0 and "clip-vit-b32-openai" in models.stdout
    datasets = run_cli("list", "datasets")
    assert "cifar10-subset-test" in datasets.stdout and "cifar100" in datasets.stdout
    suites = run_cli("list", "suites")
    assert "smoke" in suites.stdout
    assert str(REPO / "suites") in suites.stdout


def test_corrupt_images_are_named_in_the_record_and_strict_fails_keeping_finished_cells(
        tmp_path, tiny_checkpoint):
    from PIL import Image

    folder = tmp_path / "data" / "mine"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(folder / cls / f"{i}.png")
    (folder / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    suite = tmp_path / "bad.yaml"
    suite.write_text(f"""
models: [{{name: tiny-file, arch: robench-tiny-vit, pretrained: {tiny_checkpoint}}}]
datasets: [cifar10-subset-val, {{name: mine, family: folder, root: {folder}}}]
id_dataset: null
model: {{batch_size: 8, num_workers: 0}}
metrics: {{bootstrap: 0}}
""")
    out = tmp_path / "results" / "bad" / "tiny-file"
    r = run_cli(*_args(tmp_path, suite, "strict=true", "progress=false"))
    assert r.returncode == 2 and "dog/2.png" in r.stderr and "Traceback" not in r.stderr
    assert (out / "cifar10-subset-val.json").is_file()  # the finished cell is kept
    assert not (out / "mine.json").exists()
    done = (out / "cifar10-subset-val.json").stat().st_mtime_ns

    r = run_cli(*_args(tmp_path, suite, "progress=false"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "mine.json").read_text())
    assert rec["data"]["n"] == 8 and rec["data"]["n_bad"] == 1
    assert rec["data"]["bad_samples"] == ["dog/2.png"]
    assert rec["metrics"]["n"] == 7  # scored over the images that decode
    assert (out / "cifar10-subset-val.json").stat().st_mtime_ns == done  # not redone


PAIRED = """
models: [tiny-random]
datasets: [cifar10-subset-probe, cifar10-subset-val]
id_dataset: {id_dataset}
model: {{batch_size: 250, num_workers: 0}}
metrics: {{bootstrap: 0}}
"""


def test_subset_of_a_paired_suite_drops_the_pairing_with_a_note(tmp_path):
    suite = tmp_path / "paired.yaml"
    suite.write_text(PAIRED.format(id_dataset="cifar10-subset-probe"))
    r = run_cli(*_args(tmp_path, suite, "datasets=[cifar10-subset-val]", "progress=false"))
    assert r.returncode == 0, r.stderr
    assert "ood_auroc is not computed" in r.stdout
    assert "datasets=[cifar10-subset-val,cifar10-subset-probe]" in r.stdout  # how to keep it
    rec = json.loads((tmp_path / "results" / "paired" / "tiny-random" /
                      "cifar10-subset-val.json").read_text())
    assert rec["protocol"]["id_dataset"] is None and rec["protocol"]["ood_auroc"] is None
    assert rec["metrics"].get("ood_auroc") is None
    assert not (tmp_path / "results" / "paired" / "tiny-random" / "cifar10-subset-probe.json"
                ).exists()


def test_id_dataset_outside_the_run_is_an_error_naming_the_fix(tmp_path):
    suite = tmp_path / "paired.yaml"
    suite.write_text(PAIRED.format(id_dataset="cifar10-subset-probe"))
    # given explicitly on the command line: the user asked for a pairing that cannot be made
    r = run_cli(*_args(tmp_path, suite, "datasets=[cifar10-subset-val]",
                       "id_dataset=cifar10-subset-probe"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "given on the command line" in r.stderr
    assert "datasets=[cifar10-subset-val,cifar10-subset-probe]" in r.stderr
    assert "id_dataset=null" in r.stderr
    # the suite file itself pairs with a dataset it does not list
    bad = tmp_path / "inconsistent.yaml"
    bad.write_text(PAIRED.format(id_dataset="cifar10-subset-tset"))
    r = run_cli(*_args(tmp_path, bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "suite 'inconsistent' sets id_dataset: cifar10-subset-tset" in r.stderr
    assert "Did you mean" in r.stderr and "id_dataset=null" in r.stderr
    assert not (tmp_path / "results").exists()
