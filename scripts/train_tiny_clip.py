"""Train robench's tiny CLIP-style model from scratch on the shipped CIFAR-10 subset.

Contrastive image/caption training (symmetric InfoNCE, as in CLIP) on the ``pretrain`` split
only. Captions name a *context* and the class: per image and step, a context is drawn (the clean
image with probability ``p_clean``, else one of the others, uniformly), applied to the image and
named in the caption -- "a blurry photo of a cat." for a Gaussian-blurred cat, "a photo of a
cat." for a clean one. The contexts (``CONTEXTS``) are cheap tensor ops on 32x32 images chosen
to overlap the corruption families of CIFAR-10-C (blur, noise, digital: pixelate / JPEG /
contrast, weather-ish: brightness) plus two styles (black and white, dark); their captions are
the quickstart's template set ``cifar-context`` (``robench/data/metadata/
cifar_context_templates.txt``), so CAR-FT's context vectors (one per template) are ones the text
tower learned to tell apart. Zero-shot top-1 (prompt ensemble of the same templates) is reported
on ``val`` (model selection) and ``test``. Seeded and deterministic on a given machine:

    python scripts/train_tiny_clip.py

writes robench/assets/models/robench-tiny-clip-cifar10.pt (fp16 state_dict) plus ``.sha256``
and ``.json`` sidecars.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import rgb_to_grayscale

import robench.models.backbone  # noqa: F401  (registers robench's configs with open_clip)
from robench.data.folder import scan
from robench.registry import METADATA, TEMPLATE_FILES, template_set

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_SET = "cifar-context"  # the captions, and the quickstart's prompts
TEMPLATES = METADATA / TEMPLATE_FILES[TEMPLATE_SET]


@dataclass
class TrainConfig:
    model: str = "robench-tiny-clip"
    epochs: int = 40
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    pad: int = 4  # random-crop padding (pixels)
    p_clean: float = 0.5  # probability of the clean context ("a photo of a {}.")
    ensemble_weight: float = 1.0  # weight of the prompt-ensemble cross-entropy (0: CLIP loss only)
    seed: int = 0
    threads: int = 2
    max_steps: int | None = None  # stop early (tests)


def load_split(root: Path, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                    list[str]]:
    """All images of ``<root>/<class>/*.jpg`` decoded once: (N,3,H,W) uint8, labels, classnames."""
    classes, paths, labels = scan(Path(root))
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                               for c in range(len(classes))])
        paths, labels = [paths[i] for i in keep], labels[keep]
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels), [c.replace("_", " ") for c in classes]


def read_templates() -> list[str]:
    return template_set(TEMPLATE_SET)


def normalizer(preprocess: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std of the model's own evaluation preprocessing (so training matches evaluation)."""
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return (torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1))
    raise RuntimeError(f"no Normalize in {preprocess}")


def to_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, normalised exactly like ToTensor() + Normalize(); a float
    batch is taken as already in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return (x - mean) / std


def augment(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, per image, on a uint8 batch."""
    n, _, h, w = images.shape
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 3, h, w + 2 * pad)
        images = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 3, h, w)
        images = images.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


# -- contexts: image ops on float (n, 3, H, W) batches in [0, 1], severities drawn per image ----
def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur, sigma ~ U[0.7, 1.5] px per image (7-tap separable kernel, reflected at
    the border); CIFAR-10-C's blur family (defocus, glass, motion, zoom). Each image's blur is
    one (H, H) matrix B applied as B X B^T (square images), a batched matmul."""
    n, _, h, w = x.shape
    assert h == w, "square images"
    sigma = _uniform(n, 0.7, 1.5, gen)
    taps = torch.arange(-3, 4)
    k = torch.exp(-taps[None].to(x.dtype) ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 7)
    src = torch.arange(h)[:, None] + taps[None]  # (H, 7) source row of each tap, reflected
    src = src.abs()
    src = torch.where(src > h - 1, 2 * (h - 1) - src, src)
    mat = torch.zeros(n, h, h, dtype=x.dtype).scatter_add_(
        2, src[None].expand(n, h, 7), k[:, None, :].expand(n, h, 7))
    return mat[:, None] @ x @ mat.transpose(1, 2)[:, None]


def noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, std ~ U[0.04, 0.12] per image (CIFAR-10-C's noise family)."""
    std = _uniform(len(x), 0.04, 0.12, gen)[:, None, None, None]
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def pixelate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Box-downsample to s x s, s in {8, 10, 12, 16} per image, then nearest-upsample back."""
    sides = torch.tensor([8, 10, 12, 16])[torch.randint(0, 4, (len(x),), generator=gen)]
    out = x.clone()
    for s in sides.unique().tolist():
        m = sides == s
        small = F.interpolate(x[m], size=(s, s), mode="area")
        out[m] = F.interpolate(small, size=x.shape[-2:], mode="nearest")
    return out


def jpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """JPEG round trip (libjpeg through torchvision) at quality ~ U{8..30} per image."""
    quality = torch.randint(8, 31, (len(x),), generator=gen).tolist()
    u8 = (x * 255).round().to(torch.uint8)
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not a dependency);
    # they are what the shipped model was trained with, so they stay (with the warning muted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = [decode_jpeg(encode_jpeg(img, quality=q))
               for img, q in zip(u8, quality, strict=True)]
    return torch.stack(out).float() / 255


def low_contrast(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast scaled by c ~ U[0.25, 0.55] about the image mean (CIFAR-10-C contrast, fog)."""
    c = _uniform(len(x), 0.25, 0.55, gen)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * c


def grayscale(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Luma (ITU-R 601) in all three channels."""
    return rgb_to_grayscale(x, num_output_channels=3)


def dark(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Intensities scaled by b ~ U[0.25, 0.55] per image."""
    return x * _uniform(len(x), 0.25, 0.55, gen)[:, None, None, None]


def bright(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """HSV value + b, b ~ U[0.2, 0.45], hue and saturation kept (CIFAR-10-C brightness adds
    0.1-0.5 to V the same way): RGB scaled by min(V + b, 1) / V; black pixels become grey."""
    b = _uniform(len(x), 0.2, 0.45, gen)[:, None, None, None]
    v = x.amax(dim=1, keepdim=True)
    new_v = (v + b).clamp(max=1)
    return torch.where(v > 1e-3, x * new_v / v.clamp(min=1e-3), new_v.expand_as(x)).clamp(0, 1)


CLEAN = "a photo of a {}."
# caption template -> the op that makes an image fit it (None: the clean image)
CONTEXTS: dict[str, object] = {
    CLEAN: None,
    "a blurry photo of a {}.": blur,
    "a noisy photo of a {}.": noise,
    "a pixelated photo of a {}.": pixelate,
    "a jpeg compressed photo of a {}.": jpeg,
    "a low contrast photo of a {}.": low_contrast,
    "a black and white photo of a {}.": grayscale,
    "a dark photo of a {}.": dark,
    "a bright photo of a {}.": bright,
}


def context_ops(templates: list[str]) -> list[object]:
    """The op of each template, in the template file's order; the file and ``CONTEXTS`` must
    name the same contexts (a template without an op could not be trained on)."""
    if sorted(templates) != sorted(CONTEXTS) or templates.count(CLEAN) != 1:
        raise SystemExit(f"{TEMPLATES.name} must list exactly the templates of CONTEXTS: "
                         f"{list(CONTEXTS)}; it lists {templates}")
    return [CONTEXTS[t] for t in templates]


def draw_contexts(n: int, templates: list[str], p_clean: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Per image, the index of its context template: clean with probability ``p_clean``, else
    one of the others uniformly."""
    clean = templates.index(CLEAN)
    others = torch.tensor([i for i in range(len(templates)) if i != clean])
    pick = others[torch.randint(0, len(others), (n,), generator=gen)]
    is_clean = torch.rand(n, generator=gen) < p_clean
    return torch.where(is_clean, torch.full_like(pick, clean), pick)


def apply_contexts(images: torch.Tensor, which: torch.Tensor, ops: list[object],
                   gen: torch.Generator) -> torch.Tensor:
    """uint8 (n,3,H,W) -> float in [0, 1], image k passed through ``ops[which[k]]``."""
    x = images.float() / 255.0
    for i, op in enumerate(ops):
        m = which == i
        if op is not None and bool(m.any()):
            x[m] = op(x[m], gen).to(x.dtype)
    return x


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and embeddings; none on norms, biases or logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "logit_scale" in name or "bn" in name or ".ln" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def deterministic(seed: int, threads: int):
    """Fixed thread count, seeded RNGs, deterministic kernels; global settings restored after."""
    state = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(state[0])
        torch.use_deterministic_algorithms(state[1], warn_only=state[2])


def create_model(name: str, seed: int):
    """Seeded random init of the registered architecture + its eval preprocessing + tokenizer."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model, preprocess, open_clip.get_tokenizer(name)


def train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
          templates: list[str], log=print) -> tuple[torch.nn.Module, object, object]:
    """Contrastive training; returns (model, eval preprocess, tokenizer)."""
    with deterministic(cfg.seed, cfg.threads):
        return _train(cfg, images, labels, classnames, templates, log)


def _train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
           templates: list[str], log) -> tuple[torch.nn.Module, object, object]:
    model, preprocess, tokenizer = create_model(cfg.model, cfg.seed)
    mean, std = normalizer(preprocess)
    ops = context_ops(templates)
    gen = torch.Generator().manual_seed(cfg.seed)
    # All captions tokenised once: (C, T, context_length).
    captions = tokenizer([t.format(c) for c in classnames for t in templates])
    captions = captions.view(len(classnames), len(templates), -1)

    n = len(labels)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = ClipLoss()
    model.train()
    step, t0 = 0, time.time()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            y = labels[idx]
            t_idx = draw_contexts(len(idx), templates, cfg.p_clean, gen)
            x = to_input(apply_contexts(augment(images[idx], cfg.pad, gen), t_idx, ops, gen),
                         mean, std)
            text = captions[y, t_idx]  # the caption names the context the image was given
            img_f, txt_f, scale = model(x, text)[:3]
            loss = loss_fn(img_f, txt_f, scale)
            if cfg.ensemble_weight:
                loss = loss + cfg.ensemble_weight * ensemble_loss(model, img_f, y, captions,
                                                                  scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # as in CLIP: temperature clipped to at most 100
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            seen += 1
            step += 1
        if seen:
            log(f"epoch {epoch + 1:3d}/{cfg.epochs}  step {step:5d}  loss {running / seen:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  scale {model.logit_scale.exp().item():6.2f}  "
                f"{time.time() - t0:6.1f}s")
        if step >= total:
            break
    model.eval()
    return model, preprocess, tokenizer


def ensemble_loss(model: torch.nn.Module, img_f: torch.Tensor, labels: torch.Tensor,
                  captions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the prompt-ensemble head built from the current text tower:
    w_c = normalize(mean_t normalize(g(template_t(c)))) over all (C, T) captions, logits =
    scale * <img_f, w_c> -- the zero-shot classifier robench evaluates. Contrastive training
    alone lets a caption's embedding entangle context and class (on val, the ensemble head then
    lost 10-20 points on blurred / pixelated images against the matching template alone); this
    term asks the class directions to be shared across contexts."""
    n_cls, n_tpl, length = captions.shape
    emb = model.encode_text(captions.view(n_cls * n_tpl, length), normalize=True)
    w = F.normalize(emb.view(n_cls, n_tpl, -1).mean(1), dim=-1)
    return F.cross_entropy(scale * img_f @ w.T, labels)


@torch.no_grad()
def zeroshot_top1(model: torch.nn.Module, preprocess: object, tokenizer: object,
                  images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                  templates: list[str], batch_size: int = 500) -> float:
    """Top-1 (%) of the prompt-ensemble zero-shot classifier (same builder robench uses)."""
    model.eval()
    w = open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=classnames,
                                             templates=templates, num_classes_per_batch=10)
    mean, std = normalizer(preprocess)
    correct = 0
    for s in range(0, len(labels), batch_size):
        f = model.encode_image(to_input(images[s:s + batch_size], mean, std), normalize=True)
        pred = (model.logit_scale.exp() * f @ w).argmax(1)
        correct += int((pred == labels[s:s + batch_size]).sum())
    return 100.0 * correct / len(labels)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    ap.add_argument("--data", type=Path, default=REPO / "robench/assets/cifar10-subset")
    ap.add_argument("--out", type=Path,
                    default=REPO / "robench/assets/models/robench-tiny-clip-cifar10.pt")
    ap.add_argument("--model", default=d.model, help="open_clip model name (architecture)")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    ap.add_argument("--pad", type=int, default=d.pad, help="random-crop padding in pixels")
    ap.add_argument("--p-clean", type=float, default=d.p_clean,
                    help="probability that an image is left clean (else a context is applied)")
    ap.add_argument("--ensemble-weight", type=float, default=d.ensemble_weight,
                    help="weight of the prompt-ensemble cross-entropy term (0: CLIP loss only)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--no-test", action="store_true",
                    help="report val only (use while tuning: select on val, not test)")
    args = ap.parse_args()
    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                      pad=args.pad, p_clean=args.p_clean,
                      ensemble_weight=args.ensemble_weight, seed=args.seed, threads=args.threads,
                      max_steps=args.max_steps)

    t0, c0 = time.time(), time.process_time()
    images, labels, classnames = load_split(args.data / "pretrain")
    templates = read_templates()
    print(f"pretrain: {len(labels)} images, {len(classnames)} classes, {len(templates)} templates "
          f"(decoded in {time.time() - t0:.1f}s)")
    model, preprocess, tokenizer = train(cfg, images, labels, classnames, templates)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - c0

    # Save fp16, then evaluate the weights exactly as saved (fp16 -> fp32 model via open_clip).
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model,
                                                                 pretrained=str(args.out))
    results = {}
    for split in ["val"] + ([] if args.no_test else ["test"]):
        x, y, names = load_split(args.data / split)
        assert names == classnames, (names, classnames)
        results[split] = zeroshot_top1(model, preprocess, tokenizer, x, y, classnames, templates)
        print(f"zero-shot top-1 on {split}: {results[split]:.2f}% ({len(y)} images)")

    digest = sha256(args.out)
    args.out.with_name(args.out.name + ".sha256").write_text(f"{digest}  {args.out.name}\n")
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "model": cfg.model,
        "model_config": open_clip.get_model_config(cfg.model),
        "checkpoint": args.out.name,
        "sha256": digest,
        "dtype": "float16",
        "n_params": n_params,
        "size_bytes": args.out.stat().st_size,
        "train_config": asdict(cfg),
        "seed": cfg.seed,
        "data": {"train": "cifar10-subset/pretrain", "n_train": len(labels),
                 "classnames": classnames,
                 "templates": f"{TEMPLATE_SET} ({len(templates)}): {TEMPLATES.name}",
                 "contexts": {t: (op.__name__ if op else "clean")
                              for t, op in zip(templates, context_ops(templates), strict=True)}},
        "train_wall_s": round(train_s, 1),  # decode + training, on the machine below
        "train_cpu_s": round(train_cpu_s, 1),
        "machine": {"cpu_count": os.cpu_count(), "threads": cfg.threads,
                    "platform": platform.platform()},
        "zeroshot_top1": {k: round(v, 2) for k, v in results.items()},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "command": "python scripts/train_tiny_clip.py",
    }
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest[:12]}...) "
          f"in {train_s:.0f}s of training")


if __name__ == "__main__":
    main()
