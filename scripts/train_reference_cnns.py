"""Train the quickstart's reference classifiers: small standard networks, supervised, from scratch.

Effective robustness (Taori et al. 2020) reads a model's OOD accuracy against a line fitted over
*reference* models -- standard classifiers trained on the ID distribution -- never over the
adaptation methods it ranks. The quickstart has no such models to borrow (no pretrained weights
can be had here), so this script trains a few: timm's tiny test architectures (``test_resnet``,
``test_convnext``, ``test_efficientnet``: 0.1-0.4M parameters; convolutional, so they take 32x32
inputs as timm builds them -- a timm ViT is loaded at its configured input size, which the
shipped loader does not change), each with plain cross-entropy on the 6,000
images of the ``pretrain`` split (the split the tiny CLIP was trained on; disjoint from every
evaluated split), saved at two training budgets so the line has points of different accuracy.

    python scripts/train_reference_cnns.py

writes ``robench/assets/models/reference-<arch>-e<epochs>.pt`` (fp16 state dict) with ``.json``
(recipe, validation accuracy, time) and ``.sha256`` sidecars. Seeded and deterministic on a
given machine. Inputs are 32x32 images scaled to [0, 1] and normalised with the CIFAR-10
mean/std below, which the quickstart declares as each model's ``preprocess:`` block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_clip import augment, load_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# CIFAR-10 training-set channel statistics (the values every CIFAR recipe uses)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ARCHS = ("test_resnet", "test_convnext", "test_efficientnet")
BUDGETS = (4, 24)  # epochs: each architecture is saved after both


def build(arch: str) -> torch.nn.Module:
    """A 10-class network, built as robench's timm loader builds it (fully convolutional, so
    32x32 inputs need nothing else)."""
    return timm.create_model(arch, num_classes=10)


def to_input(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    pred = torch.cat([net(to_input(images[i:i + 500])).argmax(1)
                      for i in range(0, len(images), 500)])
    net.train()
    return 100.0 * float((pred == labels).float().mean())


def save(net: torch.nn.Module, out: Path, meta: dict) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n")
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"  wrote {out.name}: val {meta['val_acc1']:.2f}%", flush=True)


def train(arch: str, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
          val_y: torch.Tensor, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = build(arch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * max(BUDGETS)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine over the longest budget
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.time()
    for epoch in range(1, max(BUDGETS) + 1):
        order = torch.randperm(len(train_x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = to_input(augment(train_x[idx], args.pad, gen))
            loss = F.cross_entropy(net(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch in BUDGETS:
            meta = {"arch": f"timm:{arch}", "epochs": epoch, "of_schedule": max(BUDGETS),
                    "val_acc1": accuracy(net, val_x, val_y), "train_split": "pretrain (6,000)",
                    "recipe": {"loss": "cross-entropy", "optimizer": "AdamW", "lr": args.lr,
                               "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                               "schedule": f"cosine over {max(BUDGETS)} epochs",
                               "augment": f"random crop (pad {args.pad}) + flip",
                               "input": {"mean": MEAN, "std": STD, "size": 32}},
                    "seed": args.seed, "seconds": round(time.time() - t0, 1),
                    "torch": torch.__version__, "timm": timm.__version__,
                    "machine": platform.machine(),
                    "command": "python scripts/train_reference_cnns.py"}
            save(net, args.out / f"reference-{arch.replace('_', '-')}-e{epoch}.pt", meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "robench/assets/cifar10-subset")
    ap.add_argument("--out", type=Path, default=REPO / "robench/assets/models")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pad", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_x, train_y, _ = load_split(args.data / "pretrain")
    val_x, val_y, _ = load_split(args.data / "val")
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        print(f"{arch}: {sum(p.numel() for p in build(arch).parameters()):,} parameters",
              flush=True)
        train(arch, train_x, train_y.long(), val_x, val_y.long(), args)


if __name__ == "__main__":
    main()
