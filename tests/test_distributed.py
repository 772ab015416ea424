"""Scale-out: the shard arithmetic, and real multi-process runs through ``torchrun`` (``python -m
torch.distributed.run``, gloo on CPU, 2 ranks): records equal to one process, a rank killed
mid-extraction resumes with only the missing shards, DDP fine-tuning gives the weights of one
process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, derived_state, write_cifar10

from robench import distributed as D
from robench.errors import RobenchError


# -- arithmetic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch", [(0, 8), (1, 8), (60, 8), (64, 8), (2000, 256),
                                     (50_000, 256), (3_750_000, 256)])
def test_shards_are_whole_batches_covering_every_index_once(n, batch):
    ranges = D.shard_ranges(n, batch)
    D.verify_cover([np.arange(s, e) for s, e in ranges], n)
    assert all(s % batch == 0 for s, _ in ranges)  # a shard starts on a batch edge ...
    assert all((e - s) % batch == 0 for s, e in ranges[:-1])  # ... and holds whole batches
    assert all(e - s <= D.MAX_SHARD_BATCHES * batch for s, e in ranges)
    if n >= D.TARGET_SHARDS * batch:
        assert len(ranges) >= D.TARGET_SHARDS
        assert len(ranges) <= n / batch / D.MAX_SHARD_BATCHES + D.TARGET_SHARDS


@pytest.mark.parametrize("mode", D.SHARD_MODES)
@pytest.mark.parametrize("items,size", [(10, 1), (10, 2), (10, 3), (7, 4), (2, 5), (0, 2)])
def test_assignment_gives_every_item_to_exactly_one_rank(mode, items, size):
    parts = [D.assign(items, D.World(rank=r, size=size), mode) for r in range(size)]
    D.verify_cover([np.asarray(p, dtype=np.int64) for p in parts], items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if mode == "contiguous":
        assert all(p == list(range(p[0], p[0] + len(p))) for p in parts if p)
    with pytest.raises(RobenchError, match="shard mode"):
        D.assign(items, D.World(), "random")


def test_balance_deals_work_to_the_least_loaded_rank_deterministically():
    assert D.balance([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    assert D.balance([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert D.balance([5, 5], 1) == [0, 0]
    assert D.balance([3, 1, 2], 4) == [0, 1, 2]


def test_verify_cover_names_missing_duplicated_and_out_of_range_indices():
    D.verify_cover([np.arange(0, 3), np.arange(3, 5)], 5)
    with pytest.raises(RobenchError, match=r"1 missing \(4\)"):
        D.verify_cover([np.arange(0, 4)], 5)
    with pytest.raises(RobenchError, match=r"1 duplicated \(2\)"):
        D.verify_cover([np.arange(0, 3), np.arange(2, 5)], 5)
    with pytest.raises(RobenchError, match="outside"):
        D.verify_cover([np.arange(0, 6)], 5)


def test_launcher_environment_backend_and_device():
    assert D.env_world({}) == D.World()
    w = D.env_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.distributed, w.is_lead) == (3, 4, 1, True, False)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(RobenchError, match="launcher environment"):
            D.env_world(bad)
    assert D.backend_for("cuda:1") == "nccl" and D.backend_for("cpu") == "gloo"
    assert D.rank_device("cuda", w) == "cuda:1" and D.rank_device("cuda:0", w) == "cuda:0"
    assert D.rank_device("cuda", D.World()) == "cuda" and D.rank_device("cpu", w) == "cpu"


def test_a_single_process_creates_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = D.init("cpu")
    assert world == D.World() and not torch.distributed.is_initialized()
    world.barrier()  # collectives of a world of one are no-ops
    assert world.all_min(7) == 7 and world.broadcast({"a": 1}) == {"a": 1}


def test_a_shard_that_does_not_hold_what_it_says_is_refused(tmp_path):
    from robench.feature_shards import bound, read_shards, shard_files
    from robench.io import write_json, write_npy

    folder = tmp_path / "k.shards"
    for (s, e), rows in (((0, 4), 4), ((4, 6), 1)):
        npy, meta = shard_files(folder, s, e)
        write_npy(npy, np.zeros((rows, 3), np.float32), bound=bound(npy))
        write_json(meta, {"start": s, "stop": e, "rows": e - s, "bad": []}, bound=bound(meta))
    shards = [(folder, 0, 4), (folder, 4, 6)]
    with pytest.raises(RobenchError, match="holds 1 rows"):
        list(read_shards(shards, 6))
    with pytest.raises(RobenchError, match="missing or incomplete"):
        list(read_shards(shards + [(folder, 6, 8)], 8))
    with pytest.raises(RobenchError, match="do not cover"):
        list(read_shards(shards[:1], 6))


# -- real multi-process runs ----------------------------------------------------------------------
SUITE = """
models:
  - tiny-random
  - {{name: ts, arch: robench-tiny-vit, method: temperature-scaling,
      options: {{base: zeroshot, calibrate_on: cifar10-train}}}}
  - {{name: ft, arch: robench-tiny-vit, method: finetune,
      options: {{train_on: cifar10-train, epochs: 1, lr: 1.0e-3, batch_size: 11, warmup: 2,
                workers: 0, micro_batch: {micro}}}}}
datasets: [cifar10]
model: {{num_workers: 0, batch_size: 4}}
metrics: {{bootstrap: 20}}
progress: false
"""
N_TEST, BATCH = 400, 4  # 100 shards of one batch: a kill lands mid-extraction


def torchrun(nproc: int, *args: str, timeout: int = 240,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m torch.distributed.run --nproc-per-node N -m robench.cli ARGS`` (gloo on CPU,
    the standalone rendezvous on this machine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "robench.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _args(tmp: Path, tag: str) -> list[str]:
    return [f"suite={tmp / 's.yaml'}", f"data_root={tmp / 'data'}", f"cache_dir={tmp / tag}",
            f"results_dir={tmp / ('r' + tag)}", "device=cpu"]


def _record(path: Path) -> dict:
    rec = json.loads(path.read_text())
    rec.pop("created")
    rec.pop("integrity")  # a checksum over the record, "created" included
    rec["provenance"].pop("world_size")  # how the run was launched (tested apart)
    return rec


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun (pid ``agent``) started."""
    out = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(pid)
    return out


def _kill_rank_mid_extraction(agent: subprocess.Popen, shards: Path, rank: int) -> None:
    """Freeze every rank as soon as a few feature shards are on disk, SIGKILL ``rank``, let
    the others go on: torchrun then ends the run, as a lost node or an OOM kill would."""
    deadline = time.time() + 120
    try:
        while len(list(shards.glob("*.shards/*.json"))) < 4:
            assert agent.poll() is None and time.time() < deadline, agent.stdout.read()
            time.sleep(0.005)
        ranks = _workers(agent.pid)
        for pid in ranks.values():
            os.kill(pid, signal.SIGSTOP)
        os.kill(ranks[rank], signal.SIGKILL)
        for r, pid in ranks.items():
            if r != rank:
                os.kill(pid, signal.SIGCONT)
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same suite run by one process (in-process, no launcher) and by 2 torchrun ranks,
    the latter killed on rank 1 mid-extraction and then resumed."""
    from robench.config import load_suite
    from robench.runner import Runner

    if not Path("/proc/self/task").is_dir():
        pytest.skip("finding torchrun's workers needs Linux /proc")
    tmp = tmp_path_factory.mktemp("dist")
    write_cifar10(tmp / "data" / "cifar10", n_test=N_TEST, n_train=9)
    (tmp / "s.yaml").write_text(SUITE.format(micro=0))
    one = Runner(load_suite(str(tmp / "s.yaml"), _args(tmp, "1")[1:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): oneDNN may round a
    try:  # row of a partial batch differently when it splits the batch over 2 threads
        one.run()
    finally:
        torch.set_num_threads(threads)
    (tmp / "s.yaml").write_text(SUITE.format(micro=3))  # + gradient accumulation: 6 -> 3 + 3
    agent = torchrun(2, "-v", "run", *_args(tmp, "2"), wait=False)
    _kill_rank_mid_extraction(agent, tmp / "2" / "features", rank=1)
    killed = {"returncode": agent.returncode, "output": agent.stdout.read(),
              # a shard is done once its metadata is sealed (written last)
              "shards": {f.name: sorted(p.name.removesuffix(".json.sha256")
                                        for p in f.glob("*.json.sha256"))
                         for f in (tmp / "2" / "features").glob("*.shards")},
              "entries": sorted(p.name for p in (tmp / "2" / "features").glob("*.npy"))}
    two = torchrun(2, "-v", "run", *_args(tmp, "2"))
    assert two.returncode == 0, two.stdout + two.stderr
    return tmp, one, killed, two


def test_a_rank_killed_mid_extraction_resumes_with_only_the_missing_shards(runs):
    tmp, _, killed, two = runs
    assert killed["returncode"] != 0
    [(folder, done)] = killed["shards"].items()  # the first dataset's shards, part done
    key = folder.removesuffix(".shards")
    assert f"{key}.npy" not in killed["entries"]  # no entry is visible before the merge
    ranges = D.shard_ranges(N_TEST, BATCH)
    assert 4 <= len(done) < len(ranges) == 100
    for r in (0, 1):  # the resumed run encodes exactly the shards that were missing
        mine = [f"{s:010d}-{e:010d}" for s, e in
                (ranges[i] for i in D.assign(len(ranges), D.World(r, 2)))]
        todo = len([m for m in mine if m not in done])
        assert f"features cifar10: rank {r} extracts {todo} of its 50 shard(s)" in two.stderr
    features = tmp / "2" / "features"
    assert (features / f"{key}.npy").is_file() and not (features / folder).exists()


def test_two_ranks_write_the_records_of_one_process_bit_for_bit(runs):
    tmp, _, _, two = runs
    for model in ("tiny-random", "ts"):
        a, b = tmp / "r1" / "s" / model / "cifar10", tmp / "r2" / "s" / model / "cifar10"
        assert _record(a.with_suffix(".json")) == _record(b.with_suffix(".json"))
        with np.load(a.with_suffix(".npz")) as x, np.load(b.with_suffix(".npz")) as y:
            assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)
    feats = {f.name for f in (tmp / "1" / "features").glob("*.npy")}
    shared = feats & {f.name for f in (tmp / "2" / "features").glob("*.npy")}
    assert len(feats) == 3 and len(shared) == 2  # the test and train splits under tiny-random
    for name in shared:  # (ft's differ with its weights) the merged shards are the
        a, b = (tmp / tag / "features" / name for tag in "12")  # one-process features
        assert a.read_bytes() == b.read_bytes()
    assert not list((tmp / "2" / "features").glob("*.shards"))  # merged and cleaned up
    # every cell scored once, by one rank, and only the lead printed the table
    scored = [ln for ln in two.stdout.splitlines() if " x cifar10: acc1=" in ln]
    assert len(scored) == 3 and {ln.split(":")[0] for ln in scored} <= {"rank 0", "rank 1"}
    assert two.stdout.count("suite s: 3 cell(s)") == 1


def test_records_name_their_world_and_check_compares_ddp_trained_cells_in_band_mode(runs):
    from robench.check import render, run_check
    from robench.results import write_record_json

    tmp = runs[0]
    prov = {(n, m): json.loads((tmp / f"r{n}" / "s" / m / "cifar10.json").read_text())
            ["provenance"] for n in (1, 2) for m in ("tiny-random", "ts", "ft")}
    for n in (1, 2):
        for m in ("tiny-random", "ts"):  # no network trained: no gradients reduced
            assert (prov[n, m]["world_size"], prov[n, m]["grad_reduction"]) == (n, None)
    assert prov[1, "ft"]["grad_reduction"] == "single process"
    assert (prov[2, "ft"]["world_size"], prov[2, "ft"]["grad_reduction"]) == \
        (2, "DDP allreduce over 2 ranks")
    # same kernels and versions: the bit-identical cells exactly, the DDP-trained one in band.
    # The 2-rank run here also accumulates micro-batches, which its cell key holds (another
    # recipe: "incomparable"); to see the decision on the world size alone, a copy of its
    # record takes the one-process cell key (resealed; its metrics still match its outputs).
    fresh = tmp / "r2-same-recipe"
    shutil.copytree(tmp / "r2", fresh)
    ft = fresh / "s" / "ft" / "cifar10.json"
    rec = json.loads(ft.read_text())
    assert rec["cell_key"] != json.loads((tmp / "r1" / "s" / "ft" / "cifar10.json").read_text())[
        "cell_key"]
    rec["cell_key"] = json.loads((tmp / "r1" / "s" / "ft" / "cifar10.json").read_text())[
        "cell_key"]
    write_record_json(ft, {k: v for k, v in rec.items() if k != "integrity"})
    res = run_check(tmp / "r1" / "s", fresh / "s")
    assert res.mode == {"tiny-random/cifar10": "exact", "ts/cifar10": "exact",
                        "ft/cifar10": "band"}, render(res)
    assert not res.failed, render(res)


def test_ddp_fine_tuning_gives_the_weights_of_one_process(runs):
    tmp, one, _, _ = runs
    a = derived_state(one.prepared("ft").pretrained)
    found = sorted((tmp / "2" / "artifacts" / "finetune").glob("*/model"))
    assert len(found) == 1
    b = derived_state(f"local-dir:{found[0]}")
    assert a.keys() == b.keys()
    # equal up to float summation order: gradient sums over 6 + 5 samples per rank (and 3 + 3
    # micro-batches), a last batch of 1 sample (a zero-weight placeholder on the other rank),
    # instead of 11 in one. A rank-local mean (DDP's default averaging of unevenly split
    # batches) moves weights by ~3e-3 at most and ~5e-6 on average here.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 5e-4 and diff.mean() < 1e-7
