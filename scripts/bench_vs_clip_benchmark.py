"""Whole-command benchmark: robench against CLIP_benchmark on the same checkpoint, images, batch
size, workers and precision (fp32), for the cold-start cost of the zero-shot text head.

    # 1. fixtures, model and suites under OUT (real images, one per class, released layouts)
    python scripts/bench_vs_clip_benchmark.py prepare OUT [--realdata ../shared/realdata/imagenet]
    # 2. one command per measurement; time each as a whole process (e.g. /usr/bin/time -v or a
    #    benchmark harness that alternates the two tools and reports the ratio pair by pair)
    python scripts/bench_vs_clip_benchmark.py run OUT robench one cold
    python scripts/bench_vs_clip_benchmark.py run OUT clip_benchmark one
    #    sets: one (ImageNet-R layout) | five (ImageNet val, V2, R, Sketch, A in one run)
    #    robench: cold (empty cache) | warm (features and text head cached, cells rescored)
    # 3. or let this script time both in turn (median of N runs, ratio CLIP_benchmark/robench)
    python scripts/bench_vs_clip_benchmark.py time OUT --runs 3 [--cases one-cold five-cold]

CLIP_benchmark runs from its own virtual environment (``--cb-python``, default
``/work/bench-venv/bin/python``, made with ``pip install clip-benchmark==1.6.2 "numpy<2.4"``):
it needs ``numpy<2.4``, which robench's environment does not have. Both tools load the model from
one open_clip ``local-dir:`` folder (robench's shipped tiny CLIP, config + weights), use the 80
OpenAI ImageNet templates and open_clip's class names, ``fp32`` (CLIP_benchmark ``--no_amp``).

CLIP_benchmark has no cache: every run encodes the text head of every dataset again (1000
classes for ImageNet, V2 and Sketch, 200 for R and A; one class per forward pass) and re-reads
every image, so its cold and warm figures are the same. Two shims let it read the fixtures
offline without changing what it computes: its ImageNet-V2 reader insists on all 10,000 images
(else it downloads), so the expected size is set to the fixture's 1,000; its ImageNet-1k reader
(torchvision's ``ImageNet``) reads the devkit's class table from ``meta.bin``, which ``prepare``
writes from the public class index.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REALDATA = REPO.parent / "shared" / "realdata" / "imagenet"
DEFAULT_CB_PYTHON = "/work/bench-venv/bin/python"
BATCH_SIZE, WORKERS = 64, 2
FIVE = {  # robench name -> CLIP_benchmark name
    "imagenet": "imagenet1k", "imagenet-v2-matched-frequency": "imagenetv2",
    "imagenet-r": "imagenet-r", "imagenet-sketch": "imagenet_sketch", "imagenet-a": "imagenet-a",
}
SETS = {"one": ["imagenet-r"], "five": list(FIVE)}
CB_SHIM = ("import sys, clip_benchmark.datasets.imagenetv2 as v2; v2.V2_DATASET_SIZE = 1000; "
           "from clip_benchmark.cli import main; sys.argv[0] = 'clip_benchmark'; sys.exit(main())")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


def prepare(out: Path, realdata: Path) -> None:
    """Fixtures in the released layouts (robench's default sub-folders under ``out/data``, the
    folders CLIP_benchmark expects under ``out/cb``), the model folder and the suites."""
    import torch

    from robench.data.imagenet import subset_wnids
    from robench.models.backbone import CONFIG_DIR, load_backbone

    with open(realdata / "sample_1k_index.csv") as f:
        rows = [(r["wnid"], int(r["class_index"]), realdata / "sample_1k" / r["file"])
                for r in csv.DictReader(f)]
    data = out / "data"
    r_wnids, a_wnids = set(subset_wnids("imagenet-r")), set(subset_wnids("imagenet-a"))
    for wnid, label, path in rows:
        _link(path, data / "imagenet" / "val" / wnid / path.name)
        _link(path, data / "imagenetv2-matched-frequency-format-val" / str(label)
              / f"{label:04d}{path.stem[-8:]}.jpeg")
        _link(path, data / "imagenet-sketch" / "sketch" / wnid / path.name)
        if wnid in r_wnids:
            _link(path, data / "imagenet-r" / wnid / f"{path.stem}.jpg")
        if wnid in a_wnids:
            _link(path, data / "imagenet-a" / wnid / f"{path.stem}.jpg")
    cb = out / "cb"
    _link(data / "imagenet" / "val", cb / "imagenet1k" / "val")
    index = json.loads((realdata / "imagenet_class_index.json").read_text())
    wnid_to_classes = {w: (name,) for w, name in index.values()}
    val_wnids = [w for w, _, _ in rows]  # torchvision's devkit table, one image per class
    torch.save((wnid_to_classes, val_wnids), cb / "imagenet1k" / "meta.bin")
    _link(data / "imagenetv2-matched-frequency-format-val",
          cb / "imagenetv2" / "ImageNetV2-matched-frequency")
    _link(data / "imagenet-sketch" / "sketch", cb / "imagenet_sketch")
    _link(data / "imagenet-r", cb / "imagenet-r")
    _link(data / "imagenet-a", cb / "imagenet-a")

    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    bb = load_backbone("robench-tiny-clip", "assets:models/robench-tiny-clip-cifar10.pt", "cpu")
    cfg = json.loads((CONFIG_DIR / "robench-tiny-clip.json").read_text())
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=1))
    torch.save(bb.model.state_dict(), model / "open_clip_pytorch_model.bin")

    for name, datasets in SETS.items():
        (out / f"suite-{name}.yaml").write_text(json.dumps({
            "name": f"bench-{name}", "datasets": datasets, "id_dataset": None,
            "models": [{"name": "tiny-clip", "arch": "robench-tiny-clip",
                        "pretrained": f"local-dir:{model}"}],
            "model": {"batch_size": BATCH_SIZE, "num_workers": WORKERS, "precision": "fp32"},
            "device": "cpu", "data_root": str(data), "progress": False, "strict": False,
        }, indent=1))
    print(f"prepared {out}: {len(rows)} real images, suites suite-one.yaml / suite-five.yaml")


def command(out: Path, tool: str, which: str, cb_python: str) -> list[str]:
    if tool == "robench":
        return [sys.executable, "-m", "robench.cli", "run", f"suite={out / f'suite-{which}.yaml'}",
                f"cache_dir={out / 'robench-cache'}", f"results_dir={out / 'robench-results'}"]
    return [cb_python, "-c", CB_SHIM, "eval", "--model_type", "open_clip",
            "--model", f"local-dir:{out / 'model'}", "--pretrained", "none",
            "--dataset", *[FIVE[d] for d in SETS[which]],
            "--dataset_root", str(out / "cb" / "{dataset}"), "--task", "zeroshot_classification",
            "--batch_size", str(BATCH_SIZE), "--num_workers", str(WORKERS), "--no_amp",
            "--output", str(out / "cb-results" / "{dataset}.json")]


def reset(out: Path, tool: str, state: str) -> None:
    """Cold: no cache at all. Warm: caches kept. Results are always cleared so every cell is
    computed (robench would otherwise skip finished cells)."""
    if tool == "robench":
        shutil.rmtree(out / "robench-results", ignore_errors=True)
        if state == "cold":
            shutil.rmtree(out / "robench-cache", ignore_errors=True)
    else:
        shutil.rmtree(out / "cb-results", ignore_errors=True)
        (out / "cb-results").mkdir()  # CLIP_benchmark does not create its output folder


def run(out: Path, tool: str, which: str, state: str, cb_python: str) -> None:
    reset(out, tool, state)
    cmd = command(out, tool, which, cb_python)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)  # the timed process is the tool itself


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


CASES = ["one-cold", "five-cold", "one-warm", "five-warm"]


def time_all(out: Path, runs: int, cb_python: str, cases: list[str]) -> None:
    """Median wall seconds of each (tool, set, state), the tools alternating run by run, and the
    range of the pairwise ratios (on a shared machine the pairs see the same load)."""
    me = [sys.executable, str(Path(__file__).resolve()), "run", str(out)]
    for case in cases:
        which, state = case.split("-")
        if state == "warm":  # fill robench's cache once
            timed([*me, "robench", which, "cold", "--cb-python", cb_python])
        rb, cbt = [], []
        for _ in range(runs):
            rb.append(timed([*me, "robench", which, state, "--cb-python", cb_python]))
            cbt.append(timed([*me, "clip_benchmark", which, "cold", "--cb-python", cb_python]))
        r, c = statistics.median(rb), statistics.median(cbt)
        pairs = sorted(b / a for a, b in zip(rb, cbt, strict=True))
        print(f"{which:4s} {state}: robench {r:6.1f} s, CLIP_benchmark {c:6.1f} s, "
              f"CLIP_benchmark / robench = {c / r:4.2f} (medians of {runs}; pairs "
              f"{pairs[0]:.2f}-{pairs[-1]:.2f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("out", type=Path)
    a.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    b = sub.add_parser("run")
    b.add_argument("out", type=Path)
    b.add_argument("tool", choices=["robench", "clip_benchmark"])
    b.add_argument("which", choices=list(SETS))
    b.add_argument("state", choices=["cold", "warm"], nargs="?", default="cold")
    c = sub.add_parser("time")
    c.add_argument("out", type=Path)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    for s in (b, c):
        s.add_argument("--cb-python", default=DEFAULT_CB_PYTHON)
    args = p.parse_args()
    out = args.out.resolve()
    if args.cmd == "prepare":
        prepare(out, args.realdata)
    elif args.cmd == "run":
        run(out, args.tool, args.which, args.state, args.cb_python)
    else:
        time_all(out, args.runs, args.cb_python, args.cases)


if __name__ == "__main__":
    main()
