"""`robench check`: tolerances, regressions, missing cells, incomparable protocols, CLI."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, scored_record

from robench.check import compare_cells, render, run_check
from robench.cli import main
from robench.errors import RobenchError
from robench.results import write_record_json
from robench.runner import scale_provenance


def _record(model="m", dataset="d", acc1=80.0, ece=0.05, auroc=0.8, groups=None, **prov):
    metrics = {"n": 1000, "num_classes": 10, "acc1": acc1, "acc1_ci_low": acc1 - 2.5,
               "acc1_ci_high": acc1 + 2.5, "acc5": 99.0, "ece": ece, "ece_ci_low": ece - 0.01,
               "ece_ci_high": ece + 0.01, "mce": 0.2, "ece_adaptive": 0.05, "nll": 0.7,
               "brier": 0.3, "auroc": auroc, "auroc_ci_low": auroc - 0.02,
               "auroc_ci_high": auroc + 0.02, "aupr_err": 0.4, "fpr95": 0.7,
               "mean_confidence": 0.8}
    return {"suite": "s", "model": model, "dataset": dataset, "metrics": metrics,
            "groups": groups,
            "protocol": {"method": "zeroshot", "template_set": "cifar", "n_templates": 18,
                         "scored_classes": "all", "ece_bins": 15, "confidence": "msp"},
            "data": {"manifest_hash": "abc"},
            "provenance": {"torch": "2.14.1", "numpy": "2.4", "open_clip": "3.3.0",
                           "device": "cpu", "dtype": "fp32", "weights_hash": "w", **prov}}


def _cells(*records):
    """Records as the check's loader hands them over: {(model, dataset): record}. The decision
    is tested on hand-made numbers; reading folders (which verifies every record against its
    per-sample outputs) is tested through the command line below with real records."""
    return {(r["model"], r["dataset"]): copy.deepcopy(r) for r in records}


def test_identical_runs_pass_exactly():
    a = _cells(_record(), _record(dataset="d2"))
    b = _cells(_record(), _record(dataset="d2"))
    res = compare_cells(a, b)
    assert not res.failed and set(res.mode.values()) == {"exact"}
    assert "OK" in render(res)


def test_exact_mode_catches_a_tiny_change():
    a = _cells(_record())
    b = _cells(_record(acc1=79.95))
    res = compare_cells(a, b)
    assert res.failed
    row = res.frame().iloc[0]
    assert row["status"] == "regressed" and row["metric"] == "acc1"
    assert row["delta"] == pytest.approx(-0.05)


def test_band_mode_uses_interval_half_width():
    a = _cells(_record())
    # another device: not bit-comparable, so the band applies (acc1 half-width 2.5)
    b = _cells(_record(acc1=78.0, device="cuda"))
    res = compare_cells(a, b)
    assert not res.failed and res.mode["m/d"] == "band"
    c = _cells(_record(acc1=77.0, device="cuda"))
    assert compare_cells(a, c).failed


def test_another_cpu_kernel_family_is_compared_in_band_mode():
    # AVX2 and AVX512 kernels round differently: same versions, yet not bit-comparable
    a = _cells(_record(kernels="cpu-AVX512"))
    b = _cells(_record(acc1=79.9, kernels="cpu-AVX2"))
    res = compare_cells(a, b)
    assert not res.failed and res.mode["m/d"] == "band"
    c = _cells(_record(acc1=79.9, kernels="cpu-AVX512"))
    res = compare_cells(a, c)
    assert res.failed and res.mode["m/d"] == "exact"


def test_another_cpu_generation_of_the_same_isa_is_compared_in_band_mode():
    # two "AVX512" machines of other generations (MKL / oneDNN pick other kernels) differ in
    # the last bits: the kernel family names the generation, so their runs meet in band mode
    a = _cells(_record(kernels="cpu-AVX512 GenuineIntel 6/106 isa 1a2b3c4d"))
    b = _cells(_record(acc1=79.9,
                                       kernels="cpu-AVX512 GenuineIntel 6/143 isa 5e6f7a8b"))
    res = compare_cells(a, b)
    assert not res.failed and res.mode["m/d"] == "band"


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile {extra}

processor\t: 1
vendor_id\t: GenuineIntel
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd aes crc32 sve bf16 i8mm
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40
"""


def test_the_cpu_microarchitecture_names_generation_and_vector_extensions():
    from robench.models.backbone import cpu_microarchitecture

    x86 = cpu_microarchitecture(X86_CPUINFO.format(extra=""))
    assert x86.startswith("GenuineIntel 6/143 isa ")
    # a flag no kernel is chosen by leaves it; a vector extension changes it
    assert cpu_microarchitecture(X86_CPUINFO.format(extra="hypervisor md_clear")) == x86
    assert cpu_microarchitecture(X86_CPUINFO.format(extra="avx512_fp16")) != x86
    assert cpu_microarchitecture(X86_CPUINFO.replace("143", "106").format(extra="")) != x86
    arm = cpu_microarchitecture(ARM_CPUINFO)
    assert arm.startswith("0x41 8/0xd40 isa ")
    assert cpu_microarchitecture(ARM_CPUINFO.replace(" sve", "")) != arm


def _trained(acc1=80.0, weights_hash="w1", cell_key="k", kernels="cpu-AVX512 A", **metrics):
    rec = _record(acc1=acc1, weights_hash=weights_hash, kernels=kernels)
    rec["cell_key"] = cell_key
    rec["protocol"]["method"] = "finetune"
    rec["metrics"].update(metrics)
    return rec


def test_a_model_retrained_on_other_kernels_is_compared_by_its_cell_key():
    a = _cells(_trained())
    # same inputs (cell key), other kernels: other fine-tuned weights, compared in band mode
    res = compare_cells(a, _cells(_trained(79.0, "w2", kernels="cpu-AVX512 B")))
    assert not res.failed and res.mode["m/d"] == "band"
    res = compare_cells(a, _cells(_trained(70.0, "w2", kernels="cpu-AVX512 B")))
    assert res.failed and res.frame().iloc[0]["metric"] == "acc1"
    # same kernels, same inputs, other weights: the training changed; exact mode says where
    res = compare_cells(a, _cells(_trained(79.0, "w2")))
    assert res.failed and res.mode["m/d"] == "exact"
    assert res.frame().iloc[0]["status"] == "regressed"
    # other inputs and other weights: not the same model
    res = compare_cells(a, _cells(_trained(80.0, "w2", cell_key="k2")))
    frame = res.frame()
    assert frame.iloc[0]["status"] == "incomparable" and "weights hash" in frame.iloc[0]["note"]


def test_a_share_without_an_interval_moves_within_its_sampling_scale():
    # aupr_err 0.4 over n = 1000: half-width 1.96 sqrt(0.4 x 0.6 / 1000) = 0.0304
    a = _cells(_record(kernels="cpu-X"))
    b = _record(kernels="cpu-Y")
    b["metrics"]["aupr_err"] = 0.42
    assert not compare_cells(a, _cells(b)).failed
    b["metrics"]["aupr_err"] = 0.44
    res = compare_cells(a, _cells(b))
    row = res.frame().iloc[0]
    assert res.failed and row["metric"] == "aupr_err"
    assert row["tolerance"] == pytest.approx(1.959964 * (0.4 * 0.6 / 1000) ** 0.5, rel=1e-5)
    # the same move over 100x the samples is beyond the scale
    big = _record(kernels="cpu-X")
    big["metrics"]["n"] = 100_000
    b["metrics"].update(n=100_000, aupr_err=0.42)
    assert compare_cells(_cells(big), _cells(b)).failed
    # nll is no share: 2% of its value
    b = _record(kernels="cpu-Y")
    b["metrics"]["nll"] = 0.7 * 1.03
    assert compare_cells(a, _cells(b)).frame().iloc[0]["metric"] == "nll"


def test_single_point_statistics_are_shown_not_gated_in_band_mode():
    base = _record(kernels="cpu-X")
    base["metrics"]["max_cal_err"] = 0.3
    a = _cells(base)
    moved = copy.deepcopy(base)
    moved["metrics"].update(max_cal_err=0.8, fpr95=0.9)
    moved["provenance"]["kernels"] = "cpu-Y"
    res = compare_cells(a, _cells(moved))
    assert not res.failed and set(res.frame()["status"]) == {"moved"}
    assert set(res.frame()["metric"]) == {"max_cal_err", "fpr95"}
    assert "OK" in render(res)
    moved["provenance"]["kernels"] = "cpu-X"  # bit-comparable runs: any move fails
    res = compare_cells(a, _cells(moved))
    assert res.failed and set(res.frame()["status"]) == {"regressed"}


def test_direction_regressed_vs_improved():
    a = _cells(_record())
    worse = compare_cells(a, _cells(_record(ece=0.09)))
    assert worse.frame().iloc[0]["status"] == "regressed"
    better = compare_cells(a, _cells(_record(ece=0.01)))
    assert better.failed and better.frame().iloc[0]["status"] == "improved"
    allowed = compare_cells(a, _cells(_record(ece=0.01)), allow_improvement=True)
    assert not allowed.failed


def test_missing_extra_and_incomparable_cells():
    a = _cells(_record(), _record(dataset="d2"))
    b = _cells(_record(), _record(dataset="d3"))
    res = compare_cells(a, b)
    statuses = set(res.frame()["status"])
    assert {"missing", "extra"} <= statuses and res.failed
    other = _record()
    other["protocol"]["template_set"] = "imagenet"
    res = compare_cells(a, _cells(other, _record(dataset="d2")))
    frame = res.frame()
    assert res.failed and frame.iloc[0]["status"] == "incomparable"
    assert "template_set" in frame.iloc[0]["note"]
    w = _record(weights_hash="other")
    res = compare_cells(a, _cells(w, _record(dataset="d2")))
    assert "weights hash" in res.frame().iloc[0]["note"]


def test_groups_are_compared():
    g = {"fog/1": _record()["metrics"]}
    a = _cells(_record(groups=g))
    g2 = copy.deepcopy(g)
    g2["fog/1"]["auroc"] = 0.5
    res = compare_cells(a, _cells(_record(groups=g2)))
    row = res.frame().iloc[0]
    assert res.failed and row["group"] == "fog/1" and row["metric"] == "auroc"


def test_markdown_output():
    a = _cells(_record())
    res = compare_cells(a, _cells(_record(acc1=70.0)))
    md = render(res, "md")
    assert md.startswith("### robench check: FAIL") and "| regressed" in md


def test_cli_exit_codes_and_perturbed_baseline(tmp_path):
    a = scored_record(tmp_path / "a").parents[1]
    shutil.copytree(a, tmp_path / "b")
    ok = run_cli("check", "--baseline", str(a), "--results", str(tmp_path / "b"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rec = tmp_path / "b" / "m" / "d.json"
    data = json.loads(rec.read_text())
    data["metrics"]["auroc"] -= 0.001  # perturb one committed number
    rec.write_text(json.dumps(data))  # by hand: the record no longer matches its checksum
    edited = run_cli("check", "--baseline", str(a), "--results", str(tmp_path / "b"))
    assert edited.returncode == 2 and "fails its checksum" in edited.stderr
    assert "Traceback" not in edited.stderr
    # resealed, it no longer matches its per-sample outputs: refused, not compared
    write_record_json(rec, {k: v for k, v in data.items() if k != "integrity"})
    resealed = run_cli("check", "--baseline", str(a), "--results", str(tmp_path / "b"))
    assert resealed.returncode == 2 and "disagrees with its per-sample outputs" in resealed.stderr
    scored_record(tmp_path / "b", skill=0.5)  # a real, worse result
    bad = run_cli("check", "--baseline", str(a), "--results", str(tmp_path / "b"),
                  "--format", "md", "--summary", str(tmp_path / "summary.md"))
    assert bad.returncode == 1
    assert "regressed" in bad.stdout and "acc1" in bad.stdout
    assert "FAIL" in (tmp_path / "summary.md").read_text()
    missing = run_cli("check", "--baseline", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_the_adaptive_bin_rule_must_agree():
    old = _record()  # written before the rule was an option: robench's own rule
    a = _cells(old)
    same = _record()
    same["protocol"]["adaptive_bins"] = "robench"
    assert not compare_cells(a, _cells(same)).failed
    other = _record()
    other["protocol"]["adaptive_bins"] = "torch-uncertainty"
    res = compare_cells(a, _cells(other))
    assert res.failed and res.frame().iloc[0]["status"] == "incomparable"
    assert "adaptive_bins" in res.frame().iloc[0]["note"]


# -- a check cannot pass by accident ----------------------------------------------------------

def test_a_baseline_without_records_fails_with_its_reason():
    res = compare_cells({}, _cells(_record()), baseline="results/quickstart")
    assert res.failed and res.comparisons == 0
    [why] = res.problems
    assert why.startswith("results/quickstart holds no result records, so nothing was compared")
    text = render(res)
    assert f"FAIL: {why}" in text and "\nOK" not in text and "0 metric comparison(s)" in text
    assert f"- **{why}**" in render(res, "md")
    assert compare_cells({}, {}).failed  # nothing on either side is no pass either


def test_a_baseline_cell_missing_from_the_results_fails():
    res = compare_cells(_cells(_record()), {})
    assert res.failed and [r["status"] for r in res.rows] == ["missing"]
    assert res.problems == ["no metric was compared: every baseline cell is missing from the "
                            "fresh results or incomparable with it"]
    # one of two cells present: the comparisons made do not hide the missing one
    res = compare_cells(_cells(_record(), _record(dataset="d2")), _cells(_record()))
    assert res.failed and res.comparisons > 0 and not res.problems
    assert res.frame().iloc[0]["status"] == "missing" and res.frame().iloc[0]["dataset"] == "d2"


@pytest.mark.parametrize("option, flag", [("band", "--band"), ("rel_tol", "--rel-tol")])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_nonsensical_tolerances_are_refused(option, flag, value):
    with pytest.raises(RobenchError) as e:
        compare_cells(_cells(_record()), _cells(_record()), **{option: value})
    assert e.value.problem.startswith(f"{flag} {value!r} is not a tolerance: ")
    assert e.value.problem.endswith(" must be a finite number >= 0")
    compare_cells(_cells(_record()), _cells(_record()), **{option: 0.0})  # 0 is a tolerance
    with pytest.raises(RobenchError, match="unknown check mode 'bands'"):
        compare_cells({}, {}, mode="bands")


def test_cli_an_empty_baseline_fails_and_says_why(tmp_path, capsys):
    fresh = scored_record(tmp_path / "fresh").parents[1]
    (tmp_path / "empty").mkdir()
    summary = tmp_path / "summary.md"
    assert main(["check", "--baseline", str(tmp_path / "empty"), "--results", str(fresh),
                 "--summary", str(summary)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: {tmp_path / 'empty'} holds no result records, so nothing was compared" in out
    assert "FAIL: 1 problem(s) - 1 cell(s), 0 metric comparison(s)" in out  # 1: the extra cell
    assert "holds no result records" in summary.read_text()


@pytest.mark.parametrize("flag, value", [("--band", "-1"), ("--band", "nan"), ("--band", "inf"),
                                         ("--rel-tol", "-0.02"), ("--rel-tol", "nan"),
                                         ("--rel-tol", "inf")])
def test_cli_refuses_nonsensical_tolerances_as_bad_arguments(tmp_path, capsys, flag, value):
    """Refused while the command line is parsed (exit 2, the problem and the fix), before any
    record is read; the Python API refuses them too (run_check, above)."""
    a = scored_record(tmp_path / "a").parents[1]
    with pytest.raises(SystemExit) as e:
        main(["check", "--baseline", str(a), "--results", str(a), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"robench: error: robench check: argument {flag}: {value} must be a finite number" \
        in err
    assert "fix: see `robench check --help`" in err and "Traceback" not in err


# -- world size: DDP's gradient sums are another arithmetic ---------------------------------

def _ranks(rec: dict, n: int | None) -> dict:
    """``rec`` run under ``n`` ranks (None: written before the keys existed)."""
    trained = rec["protocol"]["method"] == "finetune"
    if n is not None:  # a network trained here was trained under the run's ranks
        rec["provenance"].update(scale_provenance(n, n if trained else None))
    return rec


def test_scale_provenance_names_the_gradient_reduction_of_trained_networks_only():
    assert scale_provenance(1, 1) == {"world_size": 1, "grad_reduction": "single process"}
    assert scale_provenance(2, 2) == {"world_size": 2,
                                      "grad_reduction": "DDP allreduce over 2 ranks"}
    assert scale_provenance(4, None) == {"world_size": 4, "grad_reduction": None}
    # a checkpoint trained by 2 ranks, reused from the cache by one process, says so
    assert scale_provenance(1, 2) == {"world_size": 1,
                                      "grad_reduction": "DDP allreduce over 2 ranks"}


def test_trained_weights_from_another_world_size_are_compared_in_band_mode():
    # the torchrun case: 2 ranks sum gradients in another order, acc1 moves within its interval
    one = _ranks(_trained(), 1)
    res = compare_cells(_cells(one), _cells(_ranks(_trained(79.0, "w2"), 2)))
    assert not res.failed and res.mode["m/d"] == "band"
    res = compare_cells(_cells(one), _cells(_ranks(_trained(70.0, "w2"), 2)))
    assert res.failed and res.frame().iloc[0]["status"] == "regressed"  # beyond the band
    # the same world size and kernels: any move is real, compared exactly
    res = compare_cells(_cells(one), _cells(_ranks(_trained(79.0, "w2"), 1)))
    assert res.failed and res.mode["m/d"] == "exact"
    two = _ranks(_trained(), 2)
    assert compare_cells(_cells(two), _cells(_ranks(_trained(), 2))).mode["m/d"] == "exact"


def test_a_baseline_without_the_world_keys_counts_as_one_process():
    old = _ranks(_trained(), None)
    assert "world_size" not in old["provenance"]
    assert compare_cells(_cells(old), _cells(_ranks(_trained(), 1))).mode["m/d"] == "exact"
    res = compare_cells(_cells(old), _cells(_ranks(_trained(79.0, "w2"), 2)))
    assert not res.failed and res.mode["m/d"] == "band"
    res = compare_cells(_cells(_ranks(_trained(79.0, "w2"), 2)), _cells(old))  # either side
    assert not res.failed and res.mode["m/d"] == "band"


def test_a_cell_no_run_trained_stays_exact_under_any_world_size():
    # zero-shot (and linear-probe, LP-CLIP) cells are bit-identical under 2 ranks
    one, two = _ranks(_record(), 1), _ranks(_record(acc1=79.95), 2)
    assert two["provenance"]["grad_reduction"] is None
    res = compare_cells(_cells(one), _cells(two))
    assert res.failed and res.mode["m/d"] == "exact"
    assert compare_cells(_cells(_ranks(_record(), None)),
                         _cells(_ranks(_record(), 2))).mode["m/d"] == "exact"


# -- outputs=logits changes what is stored, not what is computed ------------------------------

def _run_outputs(tmp, results: str, outputs: str) -> Path:
    """tiny-random on the 500 shipped validation images, in-process; the record's path."""
    from robench.config import build_config
    from robench.runner import Runner

    raw = {"name": "o", "models": ["tiny-random"], "datasets": ["cifar10-subset-val"],
           "id_dataset": None, "cache_dir": str(tmp / "cache"), "results_dir": str(tmp / results),
           "device": "cpu", "progress": False, "outputs": outputs,
           "metrics": {"bootstrap": 20}, "model": {"num_workers": 0}}
    Runner(build_config(raw)).run()
    return tmp / results / "o" / "tiny-random" / "cifar10-subset-val.json"


@pytest.fixture(scope="module")
def exact_and_logits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    return tmp, _run_outputs(tmp, "exact", "exact"), _run_outputs(tmp, "logits", "logits")


def _scored(monkeypatch) -> list:
    from robench.runner import Runner

    calls, score = [], Runner.score_cell

    def counting(self, model, dataset, *args):
        calls.append((model, dataset))
        return score(self, model, dataset, *args)

    monkeypatch.setattr(Runner, "score_cell", counting)
    return calls


def test_check_passes_between_an_exact_and_a_logits_run(exact_and_logits, capsys):

    _, exact, logits = exact_and_logits
    e, lg = json.loads(exact.read_text()), json.loads(logits.read_text())
    assert (e["outputs"]["logits"], lg["outputs"]["logits"]) == (False, True)
    # one process, a zero-shot head: no gradients were reduced
    assert e["provenance"]["world_size"] == 1 and e["provenance"]["grad_reduction"] is None
    assert e["cell_key"] == lg["cell_key"]
    for base, fresh in ((exact, logits), (logits, exact)):
        res = run_check(base.parents[2], fresh.parents[2])
        assert not res.failed and res.mode == {"tiny-random/cifar10-subset-val": "exact"}
        assert not {r["status"] for r in res.rows} - {"ok"}
    assert main(["check", "--baseline", str(exact.parents[1]),
                 "--results", str(logits.parents[1])]) == 0
    assert "OK" in capsys.readouterr().out


def test_exact_then_logits_recomputes_the_cell_with_the_same_metrics(exact_and_logits,
                                                                      monkeypatch):
    tmp, exact, _ = exact_and_logits
    shutil.copytree(tmp / "exact", tmp / "e2l")
    calls = _scored(monkeypatch)
    rec = _run_outputs(tmp, "e2l", "logits")
    assert calls == [("tiny-random", "cifar10-subset-val")]  # the stored npz lacked logits
    new, old = json.loads(rec.read_text()), json.loads(exact.read_text())
    assert new["outputs"]["logits"] is True and new["metrics"] == old["metrics"]
    assert new["groups"] == old["groups"] and new["cell_key"] == old["cell_key"]
    with np.load(rec.with_suffix(".npz")) as z:
        assert z["logits"].shape == (500, 10)
    calls.clear()
    _run_outputs(tmp, "e2l", "logits")  # now the logits are there: nothing to do
    assert calls == []


def test_logits_then_exact_reuses_the_cell(exact_and_logits, monkeypatch):
    tmp, _, logits = exact_and_logits
    shutil.copytree(tmp / "logits", tmp / "l2e")
    before = (tmp / "l2e" / logits.relative_to(tmp / "logits")).read_bytes()
    calls = _scored(monkeypatch)
    rec = _run_outputs(tmp, "l2e", "exact")
    assert calls == []  # full logits hold everything an exact run stores
    assert rec.read_bytes() == before and json.loads(before)["outputs"]["logits"] is True
