"""``robench submit``: a suite as SLURM jobs through submitit (``pip install robench[slurm]``).

    robench submit suite=imagenet-shifts slurm.partition=gpu slurm.gpus_per_node=8
    robench submit suite=leaderboard slurm.mode=groups slurm.gpus_per_node=1

Two shapes of job (``slurm.mode``):

- ``distributed`` (default): ONE job of ``slurm.nodes`` nodes x ``slurm.tasks_per_node`` tasks
  (default: one per GPU). Each SLURM task is a rank: submitit's ``TorchDistributedEnvironment``
  exports the variables ``torchrun`` would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) and the run proceeds as under ``torchrun``
  (:mod:`robench.distributed`): sharded extraction, cells dealt to ranks, DDP fine-tuning.
- ``groups``: one single-process job per backbone group (the models sharing a declared
  architecture and weights: a fine-tuned model, its WiSE-FT mixes and calibrated variants
  travel together), submitted as one job array.

Jobs are requeue-safe: a preempted or timed-out job is resubmitted by submitit
(:class:`SuiteJob` is ``Checkpointable``) and the run resumes from what is on disk (records,
feature shards, training checkpoints). Results come back in the shared ``results_dir``:
``robench results --dir <results_dir>/<suite>``, ``robench report --results <results_dir>``.
``slurm.cluster=local`` runs the same jobs as local processes (submitit's LocalExecutor), which
is how the tests exercise this module. Only then: without ``sbatch`` on ``PATH``, any other
``robench submit`` is an error (a ``slurm.partition=gpu`` job must never quietly run on the
login node).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robench.errors import RobenchError, unknown
from robench.outpaths import output_folder

MODES = ("distributed", "groups")
# (key, lowest, highest) of the numeric slurm settings: beyond them a value is a typo
RANGES = (("nodes", 1, 4096), ("gpus_per_node", 0, 64), ("tasks_per_node", 0, 1024),
          ("cpus_per_task", 1, 1024), ("mem_gb", 0, 2**20), ("timeout_min", 1, 10**6))
CLUSTERS = ("auto", "slurm", "local", "debug")


@dataclass
class SlurmConfig:
    """``slurm.<key>=value`` of ``robench submit``."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU (one on a CPU node)
    cpus_per_task: int = 8
    mem_gb: int = 0  # 0: the partition's default
    timeout_min: int = 24 * 60
    mode: str = "distributed"
    cluster: str = "auto"  # auto / slurm: SLURM (sbatch on PATH); local: local processes
    folder: str = "slurm_logs/%j"  # submitit's logs and pickles (%j: the job id)
    job_name: str = "robench"
    wait: bool = False  # wait for the jobs and print the leaderboard


def split_slurm(overrides: Sequence[str]) -> tuple[SlurmConfig, list[str]]:
    """The ``slurm.*`` overrides as a :class:`SlurmConfig`, and the run's own overrides."""
    mine = [o.removeprefix("slurm.") for o in overrides if o.startswith("slurm.")]
    rest = [o for o in overrides if not o.startswith("slurm.")]
    valid = [f.name for f in fields(SlurmConfig)]
    for o in mine:
        key = o.split("=", 1)[0]
        if "=" not in o or key not in valid:
            raise unknown("slurm key", f"slurm.{key}", [f"slurm.{k}" for k in valid],
                          fix="write slurm.<key>=value with a key of `robench submit --help`")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SlurmConfig), OmegaConf.from_dotlist(mine))
    except OmegaConfBaseException as e:
        raise RobenchError(f"bad slurm setting: {getattr(e, 'msg', e)}",
                           "check the value's type (e.g. slurm.gpus_per_node=8)") from e
    slurm = SlurmConfig(**OmegaConf.to_container(cfg))
    if slurm.mode not in MODES:
        raise unknown("slurm.mode", slurm.mode, MODES)
    if slurm.cluster not in CLUSTERS:
        raise unknown("slurm.cluster", slurm.cluster, CLUSTERS)
    for key, low, high in RANGES:
        value = getattr(slurm, key)
        if not low <= value <= high:
            raise RobenchError(f"slurm.{key}={value} must lie in {low}..{high:,}",
                               f"e.g. slurm.{key}={getattr(SlurmConfig, key) or low}")
    for key in ("folder", "job_name"):
        if not str(getattr(slurm, key)).strip():
            raise RobenchError(f"slurm.{key} is empty",
                               f"e.g. slurm.{key}={getattr(SlurmConfig, key)}")
    if slurm.mode == "groups" and slurm.nodes > 1:
        raise RobenchError("slurm.mode=groups runs single-process jobs: slurm.nodes must be 1",
                           "use slurm.mode=distributed for a multi-node run")
    return slurm, rest


def require_scheduler(slurm: SlurmConfig) -> None:
    """SLURM must be there unless local execution is asked for (``slurm.cluster=local`` or
    ``debug``): without ``sbatch``, submitit's auto executor would run the jobs as local
    processes on this machine, ignoring the partition, nodes and GPUs asked for."""
    if slurm.cluster in ("local", "debug") or shutil.which("sbatch") is not None:
        return
    asked = {k: v for k, v in asdict(slurm).items() if v != getattr(SlurmConfig, k, v)
             and k not in ("wait", "folder", "job_name")}
    settings = " ".join(f"slurm.{k}={v}" for k, v in asked.items())
    raise RobenchError(
        "SLURM is not available here (no sbatch on PATH)"
        + (f", so {settings} cannot be honoured" if settings else ""),
        "run robench submit on a SLURM login node (sbatch on PATH); to run the jobs as local "
        "processes on this machine instead, pass slurm.cluster=local (or use robench run, or "
        "torchrun -m robench run)")


def model_groups(cfg: Any) -> list[list[str]]:
    """The suite's model declarations (by name) grouped by declared (architecture, weights):
    what one ``groups`` job runs, so a model and what is derived from it stay together."""
    from robench.registry import resolve_model

    groups: dict[tuple, list[str]] = {}
    for item in cfg.models:
        plain = OmegaConf.to_container(item) if not isinstance(item, str) else item
        name, spec = resolve_model(plain)
        groups.setdefault((spec.arch, spec.pretrained), []).append(name)
    return list(groups.values())


class SuiteJob:
    """One job: run ``suite`` with ``overrides`` (only the models named in ``only``, if given),
    as one rank of a distributed run when ``distributed_run``. Requeued on preemption or
    timeout: submitit calls :meth:`checkpoint` (the protocol of ``submitit.helpers.
    Checkpointable``) and resubmits the same call, which is safe because a run resumes from its
    records, shards and checkpoints."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self, suite: str, overrides: list[str], only: list[str] | None = None,
                 distributed_run: bool = False) -> list[str]:
        from robench import distributed
        from robench.config import load_suite
        from robench.registry import resolve_model
        from robench.runner import Runner

        if distributed_run:
            import submitit

            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's (or the local
            # executor's) variables; every rank sees all of its node's GPUs and picks its own
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = load_suite(suite, overrides)
        if only is not None:
            cfg.models = [m for m in cfg.models
                          if resolve_model(m if isinstance(m, str) else
                                           OmegaConf.to_container(m))[0] in only]
        try:
            return [str(p) for p in Runner(cfg).run()]
        finally:
            distributed.shutdown()


def executor(slurm: SlurmConfig, tasks: int) -> Any:
    """A submitit executor for ``slurm`` (``tasks`` tasks per node)."""
    try:
        import submitit
    except ImportError as e:
        raise RobenchError("robench submit needs submitit",
                           'pip install "robench[slurm]" (or pip install submitit)') from e
    cluster = None if slurm.cluster == "auto" else slurm.cluster
    ex = submitit.AutoExecutor(folder=slurm.folder, cluster=cluster)
    params: dict[str, Any] = {"name": slurm.job_name, "timeout_min": slurm.timeout_min,
                              "nodes": slurm.nodes, "tasks_per_node": tasks,
                              "cpus_per_task": slurm.cpus_per_task}
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb:
        params["mem_gb"] = slurm.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(slurm, key):
            params[f"slurm_{key}"] = getattr(slurm, key)
    ex.update_parameters(**params)
    return ex


def submit(suite: str, overrides: Sequence[str]) -> tuple[list[Any], SlurmConfig, Any]:
    """Validate the suite (before anything is queued), then submit it; returns (jobs, the slurm
    settings, the run config)."""
    from robench.config import load_suite, preflight

    slurm, rest = split_slurm(overrides)
    require_scheduler(slurm)
    logs = slurm.folder.split("%", 1)[0] or "."  # submitit fills in %j: check what precedes it
    output_folder(logs, "slurm.folder", "give slurm.folder a writable folder (on a file "
                  "system the nodes share), e.g. slurm.folder=slurm_logs/%j")
    cfg = load_suite(suite, rest)  # config errors now, not in a job hours later
    preflight(cfg)
    # the jobs read the suite again: from its resolved file, with the same overrides
    suite_ref = cfg.meta.path or suite
    job = SuiteJob()
    if slurm.mode == "distributed":
        tasks = slurm.tasks_per_node or max(1, slurm.gpus_per_node)
        jobs = [executor(slurm, tasks).submit(job, suite_ref, rest, None, True)]
    else:
        ex = executor(slurm, 1)
        with ex.batch():
            jobs = [ex.submit(job, suite_ref, rest, names, False) for names in model_groups(cfg)]
    return jobs, slurm, cfg


def describe(jobs: list[Any], slurm: SlurmConfig, cfg: Any) -> str:
    """What was submitted and how the results come back."""
    where = f"{cfg.results_dir}/{cfg.name}"
    lines = [f"submitted {len(jobs)} job(s) ({slurm.mode}): " +
             ", ".join(str(j.job_id) for j in jobs),
             f"logs: {Path(slurm.folder).parent if '%' in slurm.folder else slurm.folder}/",
             f"settings: {asdict(slurm)}",
             f"results: robench results --dir {where}   (records land there as cells finish; "
             "a requeued job resumes)",
             f"report:  robench report --results {cfg.results_dir}"]
    return "\n".join(lines)


def wait_for(jobs: list[Any]) -> list[list[str]]:
    """Wait for every job; the record paths each returned (a distributed job: its lead task's).
    A failed job is a RobenchError naming its log."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    out = []
    for job in jobs:
        try:
            out.append(job.results()[0])  # every task returns the suite's paths
        except (FailedJobError, UncompletedJobError) as e:
            first = str(e).strip().splitlines()
            raise RobenchError(f"job {job.job_id} failed: {first[-1] if first else e}",
                               f"read its log ({job.paths.stderr}); re-submit to resume") from e
    return out
