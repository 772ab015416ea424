"""CLI conventions: --version, generated --help, --format json/csv/md/latex, pipes, completion,
robench env, and every documented user error path (exit 2, problem + fix, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

import robench
from robench.config import config_keys

BASELINE = REPO / "results" / "quickstart"


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"robench {robench.__version__}"


def test_python_dash_m_robench_is_the_command_line():
    """``python -m robench`` (robench/__main__.py) runs the CLI, so module launchers work."""
    r = subprocess.run([sys.executable, "-m", "robench", "--version"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"robench {robench.__version__}"
    bad = subprocess.run([sys.executable, "-m", "robench", "results", "--dir", "/nonexistent"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "fix:" in bad.stderr and "Traceback" not in bad.stderr


def test_torchrun_dash_m_robench_as_the_readme_writes_it():
    """The README's ``torchrun ... -m robench run ...`` line: torchrun runs the module."""
    readme = (REPO / "README.md").read_text()
    assert "-m robench.cli" not in readme and "torchrun --nproc-per-node 2 -m robench run" in readme
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                        "-m", "robench", "--version"], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"robench {robench.__version__}" in r.stdout


def test_run_help_lists_every_config_key_with_default_and_meaning():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    keys = config_keys()
    assert {"model.batch_size", "metrics.bootstrap", "device", "verbosity", "progress"} <= {
        k for k, _, _ in keys}
    for key, default, meaning in keys:
        line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith(
            f"{key}={default} ")), None)
        assert line is not None, key
        assert meaning and meaning.split()[0] in line, key
    assert "'models=[tiny-clip-cifar10]'" in r.stdout  # the zsh quoting advice


def test_help_is_generated_from_the_schema(monkeypatch):
    from dataclasses import field, make_dataclass

    from robench import config

    extra = make_dataclass("X", [("answer", int, field(default=42, metadata={"help": "why"}))])
    assert config.config_keys(extra) == [("answer", "42", "why")]


@pytest.mark.parametrize("what", ["models", "datasets", "suites"])
def test_list_as_json(what):
    from robench import registry
    from robench.config import available_suites

    r = run_cli("list", what, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    names = [row["name"] for row in rows]
    expected = {"models": registry.MODELS, "datasets": registry.DATASETS,
                "suites": available_suites()}[what]
    assert set(expected) <= set(names)
    if what == "suites":
        smoke = next(row for row in rows if row["name"] == "smoke")
        assert smoke["models"] == ["tiny-random"] and "cifar10-subset-test" in smoke["datasets"]
    if what == "models":
        assert {"name", "method", "arch", "pretrained", "description"} <= set(rows[0])


def test_results_formats_keep_the_intervals():
    rec = json.loads((BASELINE / "tiny-clip-cifar10" / "cifar10-subset-test.json").read_text())
    acc1, ece = f"{rec['metrics']['acc1']:.2f} [", f"{rec['metrics']['ece']:.4f} ["
    n_cells = len(list(BASELINE.glob("*/*.json")))
    table = run_cli("results", "--dir", str(BASELINE))
    assert table.returncode == 0
    line = next(ln for ln in table.stdout.splitlines() if "tiny-clip-cifar10 " in ln and
                "cifar10-subset-test " in ln)
    assert acc1 in line and ece in line  # acc1 and ECE with their intervals
    md = run_cli("results", "--dir", str(BASELINE), "--format", "md").stdout
    assert md.startswith("| model") and acc1 in md
    latex = run_cli("results", "--dir", str(BASELINE), "--format", "latex").stdout
    assert "\\begin{tabular}" in latex and "ood\\_auroc" in latex and acc1 in latex
    csv = run_cli("results", "--dir", str(BASELINE), "--format", "csv").stdout
    header = csv.splitlines()[0].split(",")
    assert {"acc1", "acc1_ci_low", "acc1_ci_high", "ece_ci_low", "auroc_ci_high"} <= set(header)
    n_models = len(list(BASELINE.glob("*/")))
    assert len(csv.splitlines()) == 1 + n_cells + n_models  # + each model's avg shift row
    rows = json.loads(run_cli("results", "--dir", str(BASELINE), "--format", "json").stdout)
    assert len(rows) == n_cells + n_models == 34 + 17
    assert rows[0]["acc1_ci_low"] < rows[0]["acc1"] < rows[0]["acc1_ci_high"]
    avg = {r["model"]: r for r in rows if r["dataset"] == "avg shift"}
    shifted = {r["model"]: r["acc1"] for r in rows if r["dataset"] == "cifar10-subset-test-c"}
    assert {m: r["acc1"] for m, r in avg.items()} == shifted  # the one shifted set, not the ID


@pytest.mark.parametrize("args", [("results", "--dir", str(BASELINE), "--format", "json"),
                                  ("list", "datasets"), ("run", "--help")])
def test_a_closed_pipe_is_not_a_traceback(args):
    """`robench ... | head`: the reader goes away before robench writes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "robench.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO, env=env)
    p.stdout.close()  # as `head` exiting
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode in (0, 141)  # 0 when all output fitted before the reader left


def test_head_of_a_pipeline_in_a_shell():
    cmd = (f"{sys.executable} -m robench.cli results --dir {BASELINE} --format json | head -n 2; "
           f"{sys.executable} -m robench.cli list datasets | head -n 1")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert "Traceback" not in r.stderr and len(r.stdout.splitlines()) == 3


def test_env_reports_versions_device_cache_and_what_is_present(tmp_path):
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "features" / "x.npy").write_bytes(b"0" * 2048)
    r = run_cli("env", "--format", "json", "--cache-dir", str(cache), "--data-root",
                str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    import numpy
    import torch

    assert rep["versions"]["robench"] == robench.__version__
    assert rep["versions"]["torch"] == torch.__version__.split("+")[0] or \
        rep["versions"]["torch"] == torch.__version__
    assert rep["versions"]["numpy"] == numpy.__version__ and rep["versions"]["open_clip_torch"]
    assert rep["device"]["auto"] in ("cpu", "cuda", "mps")
    assert rep["device"]["cpu_kernels"].startswith("cpu-")
    assert rep["cache"] == {"dir": str(cache), "exists": True, "bytes": 2048}
    ds = {d["name"]: d for d in rep["datasets"]}
    assert ds["cifar10-subset-test"]["present"] and not ds["imagenet-r"]["present"]
    assert ds["imagenet-r"]["how"] == "robench data download imagenet-r"
    assert "manual" in ds["imagenet"]["how"]
    models = {m["name"]: m for m in rep["models"]}
    assert models["tiny-clip-cifar10"]["present"] and models["tiny-random"]["present"]
    assert not models["clip-vit-b32-openai"]["present"]
    assert "allow_download=true" in models["clip-vit-b32-openai"]["how"]
    assert "models=[clip-vit-b32-openai]" in models["clip-vit-b32-openai"]["how"]
    text = run_cli("doctor", "--cache-dir", str(cache)).stdout
    assert "kernels cpu-" in text and "2.0 KiB" in text and "MISS clip-vit-b32-openai" in text
    assert "get it: robench data download imagenet-r" in text


def _complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n",
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    r = subprocess.run([sys.executable, "-m", "robench.cli"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out.read_text().split("\n")


def test_completion_of_subcommands_suites_models_datasets_and_keys(tmp_path):
    pytest.importorskip("argcomplete")
    from robench import registry

    assert {"run", "results", "check", "list", "env", "data", "report", "completion"} <= set(
        _complete("robench ", tmp_path))
    assert set(_complete("robench run suite=", tmp_path)) >= {"suite=quickstart", "suite=smoke"}
    assert _complete("robench run suite=qu", tmp_path) == ["suite=quickstart "]
    models = _complete("robench run models=[tiny-", tmp_path)
    assert {m.replace("\\", "") for m in models} == {
        f"models=[{m}" for m in registry.MODELS if m.startswith("tiny-")}
    datasets = _complete("robench run datasets=[cifar10,imagenet-v2-t", tmp_path)
    assert [d.replace("\\", "") for d in datasets] == [
        "datasets=[cifar10,imagenet-v2-threshold-0.7", "datasets=[cifar10,imagenet-v2-top-images"]
    assert "model.batch_size=" in _complete("robench run model.", tmp_path)
    assert _complete("robench run device=c", tmp_path) == ["device=cpu", "device=cuda"]
    assert set(_complete("robench data verify imagenet-", tmp_path)) >= {"imagenet-r",
                                                                          "imagenet-sketch"}
    assert set(_complete("robench list ", tmp_path)) >= {"models", "datasets", "suites"}


def test_completion_script():
    pytest.importorskip("argcomplete")
    r = run_cli("completion", "bash")
    assert r.returncode == 0 and "complete" in r.stdout and "robench" in r.stdout
    assert run_cli("completion", "zsh").returncode == 0


# -- every documented user error path -------------------------------------------------------------
BAD_YAML = "models: [tiny-random\ndatasets: ["
EMPTY = "description: nothing\n"


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


ERRORS = [
    # (arguments, text the message must hold); {tmp} is a fresh folder
    (["run", "suite=smokey"], "Did you mean 'smoke'"),
    (["run", "suite=smoke", "modle.batch_size=3"], "Did you mean 'model"),
    (["run", "suite=smoke", "datasets=[cifar-10]"], "Did you mean 'cifar10'"),
    (["run", "suite=smoke", "models=[clip-vit-b32-opena]"], "Did you mean 'clip-vit-b32-openai'"),
    (["run", "suite=smoke", "model.batch_size"], "expected key=value"),
    (["run", "suite=smoke", "model.batch_size=many"], "invalid value"),
    (["run", "suite=smoke", "model.precision=fp8"], "unknown precision 'fp8'"),
    (["run", "suite=smoke", "device=gpu"], "use device=cuda"),
    (["run", "suite=smoke", "verbosity=silent"], "unknown verbosity 'silent'"),
    (["run", "suite=smoke", "id_dataset=imagenet"], "is not one of this run's datasets"),
    (["run", "suite=smoke", "models=[clip-vit-b32-openai]", "datasets=[cifar10-subset-test]"],
     "not in the local cache"),
    (["run", "suite=smoke", "datasets=[cifar10]", "id_dataset=null",
      "data.cifar10.root={tmp}/nope"], "robench data download cifar10"),
    (["run", "suite={tmp}/bad.yaml"], "cannot parse suite file"),
    (["run", "suite={tmp}/empty.yaml"], "names no models or no datasets"),
    (["check", "--baseline", "{tmp}/nope"], "--baseline results/quickstart"),
    (["check", "--baseline", str(BASELINE), "--results", "{tmp}/nope"], "--results"),
    (["check", "--baseline", str(BASELINE)], "robench run suite=quickstart"),
    (["results", "--dir", "{tmp}/nope"], "--dir"),
    (["report", "--results", "{tmp}/nope", "--out", "{tmp}/rep"], "does not exist"),
    (["data", "verify", "imagenet-aa"], "Did you mean 'imagenet-a'"),
    (["data", "verify"], "no dataset named"),
    (["data", "verify", "imagenet", "data.x=1"], "need --suite"),
    (["data", "verify", "imagenet", "imagenet-a", "--root", "{tmp}"], "exactly one dataset"),
    (["data", "download", "imagenet-rr"], "Did you mean 'imagenet-r'"),
    (["data", "corrupt", "--from", "cifar10-subset-test-c", "--out", "{tmp}/c"],
     "is itself a -C set"),
    (["data", "corrupt", "--from", "cifar10-subset-val", "--out", "{tmp}/c",
      "--corruptions", "fog,smog"], "unknown corruption 'smog'"),
    (["data", "corrupt", "--protocol", "cifar", "--from", "cifar10-subset-val", "--out",
      "{tmp}/c"], "Did you mean 'cifar-c'"),
    (["data", "corrupt", "--resize", "224", "--from", "imagenet", "--out", "{tmp}/c"],
     "unknown resize rule '224'"),
]
if _no_cuda():
    ERRORS.append((["run", "suite=smoke", "device=cuda"], "CUDA is not available"))


@pytest.mark.parametrize(("args", "needle"), ERRORS, ids=[" ".join(a)[:60] for a, _ in ERRORS])
def test_user_errors_exit_2_with_problem_and_fix_and_no_traceback(tmp_path, args, needle):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "empty.yaml").write_text(EMPTY)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    extra = [f"cache_dir={tmp_path}/cache", f"results_dir={tmp_path}/runs"] \
        if args[0] == "run" else []
    r = run_cli(*args, *extra, cwd=tmp_path, env={"ROBENCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("robench: error: ") and "\n  fix: " in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    if args[0] == "run":
        assert not (tmp_path / "cache" / "features").exists()  # failed before any work


def test_check_never_suggests_a_flag_it_does_not_have(tmp_path):
    r = run_cli("check", "--baseline", str(BASELINE), cwd=tmp_path)
    assert "--dir" not in r.stderr
    r = run_cli("check", "--baseline", str(BASELINE), "--results", str(tmp_path / "x"))
    assert "--dir" not in r.stderr


def test_no_suite_anywhere_is_an_error_not_a_difflib_traceback(monkeypatch, tmp_path, capsys):
    from robench import config
    from robench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "PACKAGE_SUITES", tmp_path / "absent")
    assert main(["run", "suite=smoke"]) == 2
    assert "unknown suite 'smoke'" in capsys.readouterr().err
    assert main(["list", "suites"]) == 2
    assert "no suite found" in capsys.readouterr().err
