"""``robench submit``: a suite as SLURM jobs through submitit, tested with submitit's local
executor (real processes, SLURM-like task environment) and its in-process debug executor."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_cli, write_cifar10

from robench.errors import RobenchError
from robench.submit import (
    SlurmConfig,
    model_groups,
    require_scheduler,
    split_slurm,
    submit,
    wait_for,
)

pytest.importorskip("submitit")

SUITE = """
models:
  - tiny-random
  - {name: ts, arch: robench-tiny-vit, method: temperature-scaling,
     options: {base: zeroshot, calibrate_on: cifar10-train}}
  - {name: other, arch: robench-tiny-vit, pretrained: PRETRAINED}
datasets: [cifar10]
model: {num_workers: 0, batch_size: 8}
metrics: {bootstrap: 20}
progress: false
"""


@pytest.fixture()
def suite(tmp_path, tiny_checkpoint):
    write_cifar10(tmp_path / "data" / "cifar10", n_test=40, n_train=4)
    (tmp_path / "s.yaml").write_text(SUITE.replace("PRETRAINED", str(tiny_checkpoint)))
    return tmp_path


def _args(tmp, tag):
    return [f"data_root={tmp / 'data'}", "device=cpu", f"cache_dir={tmp / ('c' + tag)}",
            f"results_dir={tmp / ('r' + tag)}"]


def test_slurm_settings_are_parsed_and_checked():
    slurm, rest = split_slurm(["slurm.partition=gpu", "slurm.gpus_per_node=8", "device=cuda"])
    assert (slurm.partition, slurm.gpus_per_node, rest) == ("gpu", 8, ["device=cuda"])
    assert split_slurm([])[0] == SlurmConfig()
    for bad, match in ((["slurm.gpus=8"], "Did you mean"), (["slurm.mode=array"], "slurm.mode"),
                       (["slurm.nodes=two"], "bad slurm setting"),
                       (["slurm.nodes=0"], "must lie in 1.."),
                       (["slurm.mode=groups", "slurm.nodes=2"], "single-process")):
        with pytest.raises(RobenchError, match=match):
            split_slurm(bad)


def _path_with(tmp_path, sbatch: bool) -> str:
    """A PATH holding only a folder with (or without) an executable ``sbatch``."""
    folder = tmp_path / ("with" if sbatch else "without")
    folder.mkdir()
    if sbatch:
        (folder / "sbatch").write_text("#!/bin/sh\nexit 0\n")
        (folder / "sbatch").chmod(0o755)
    return str(folder)


def test_a_slurm_setting_without_slurm_is_an_error_not_a_local_run(suite, monkeypatch, capsys):
    """No sbatch on PATH: submitit's auto executor would quietly run the job on this machine;
    robench refuses, names the setting it could not honour and the explicit local option,
    and queues nothing."""
    from robench.cli import main

    monkeypatch.setenv("PATH", _path_with(suite, sbatch=False))
    code = main(["submit", f"suite={suite / 's.yaml'}", *_args(suite, "p"),
                 "slurm.partition=gpu", f"slurm.folder={suite / 'logs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no sbatch on PATH" in err and "slurm.partition=gpu" in err, err
    assert "slurm.cluster=local" in err.split("fix:")[1]
    assert not (suite / "logs").exists() and not (suite / "rp").exists()
    for cluster in ("auto", "slurm"):
        with pytest.raises(RobenchError, match="SLURM is not available here"):
            require_scheduler(SlurmConfig(cluster=cluster))
    for cluster in ("local", "debug"):  # asked for explicitly: fine without SLURM
        require_scheduler(SlurmConfig(cluster=cluster, partition="gpu"))
    monkeypatch.setenv("PATH", _path_with(suite, sbatch=True))
    require_scheduler(SlurmConfig(partition="gpu"))  # SLURM is there: submitted to it


def test_groups_keep_a_backbone_and_what_derives_from_it_together(suite):
    from robench.config import load_suite

    cfg = load_suite(str(suite / "s.yaml"), _args(suite, "x"))
    assert model_groups(cfg) == [["tiny-random", "ts"], ["other"]]


def test_groups_mode_submits_one_job_per_backbone_group(suite, monkeypatch):
    monkeypatch.chdir(suite)
    jobs, slurm, cfg = submit(str(suite / "s.yaml"), _args(suite, "g") + [
        "slurm.mode=groups", "slurm.cluster=debug", f"slurm.folder={suite / 'logs'}"])
    assert len(jobs) == 2
    paths = wait_for(jobs)
    assert [sorted(os.path.basename(os.path.dirname(p)) for p in ps) for ps in paths] == \
        [["tiny-random", "ts"], ["other"]]
    assert all(os.path.isfile(p) for ps in paths for p in ps)


def test_a_bad_suite_fails_before_anything_is_queued(suite):
    r = run_cli("submit", f"suite={suite / 's.yaml'}", "model.batch_sise=8",
                "slurm.cluster=local", f"slurm.folder={suite / 'logs'}")
    assert r.returncode == 2 and "batch_size" in r.stderr and "Traceback" not in r.stderr
    assert not (suite / "logs").exists()


def test_distributed_job_on_the_local_executor_equals_one_process(suite):
    """One job of 2 tasks (ranks, gloo) through submitit's LocalExecutor, as SLURM would run
    it: the records are those of a plain one-process run."""
    from robench.config import load_suite
    from robench.runner import Runner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's ranks (OMP_NUM_THREADS=1 below)
    try:
        Runner(load_suite(str(suite / "s.yaml"), _args(suite, "1"))).run()
    finally:
        torch.set_num_threads(threads)
    r = run_cli("submit", f"suite={suite / 's.yaml'}", *_args(suite, "2"), "slurm.cluster=local",
                "slurm.tasks_per_node=2", "slurm.wait=true",
                f"slurm.folder={suite / 'logs' / '%j'}", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 1 job(s) (distributed)" in r.stdout and "robench results --dir" in r.stdout
    logs = "".join(p.read_text() for p in (suite / "logs").rglob("*_log.out"))
    assert "rank 1: " in logs  # the second task was rank 1 of the same run
    for model in ("tiny-random", "ts", "other"):
        a, b = (json.loads((suite / f"r{t}" / "s" / model / "cifar10.json").read_text())
                for t in "12")
        a.pop("created"), b.pop("created")
        a.pop("integrity"), b.pop("integrity")  # checksums over "created" too
        for rec in (a, b):  # the one thing the world size changes: the record says it
            rec["provenance"].pop("world_size")
        assert a == b
