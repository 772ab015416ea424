"""End-to-end fine-tuning of the image encoder: plain ``finetune`` and ``car-ft``.

Both train the image tower (text tower and logit scale frozen) with cross-entropy on labelled ID
data through a linear head initialised from the zero-shot weights of the training label space
(Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", WiSE-FT, section 2):

    logits(x) = s * <normalize(f_theta(x)), W>,   s = exp(logit_scale), W init = zero-shot weights.

CAR-FT (Mao et al., "Context-Aware Robust Fine-Tuning", arXiv 2211.16175, IJCV 2024) adds a
context regulariser that keeps the fine-tuned encoder's *context* distribution close to the
pre-trained one's:

    L = CE(logits(x), y) + lambda * KL(p_ctx(x; theta_0) || p_ctx(x; theta)),
    p_ctx(x; theta) = softmax_i(s * <normalize(f_theta(x)), v_i>),
    v_i = normalize(mean_c normalize(g(template_i(c)))),

with theta_0 the frozen pre-trained encoder and v_i one context vector per prompt template.
With lambda = 0 CAR-FT is plain fine-tuning, and at initialisation (theta = theta_0) its KL term
is 0. Defaults follow the WiSE-FT line: AdamW, lr 1e-5..3e-5 for real CLIPs (the tiny quickstart
model uses a larger one), weight decay 0.1, cosine schedule with warm-up, grad-clip 1.0.

Training checkpoints every epoch into the artifact folder and resumes from the last one; the
final checkpoint (the whole CLIP state dict) is then evaluated like any other backbone.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from robench.artifacts import artifact_dir, intact
from robench.errors import RobenchError
from robench.io import (
    CorruptEntry,
    atomic_write,
    discard,
    entry_lock,
    load_npz,
    seal_file,
    verify_file,
    write_npz,
)
from robench.models.backbone import Backbone, load_backbone, save_derived
from robench.models.heads import LinearHead
from robench.models.zeroshot import class_embeddings
from robench.progress import progress_bar as tqdm  # a bar on a TTY, lines in a log
from robench.registry import ModelSpec

DEFAULTS = {"epochs": 5, "lr": 3e-5, "weight_decay": 0.1, "batch_size": 128, "warmup": 50,
            "grad_clip": 1.0, "lam": 0.0, "label_smoothing": 0.0, "train_on": "", "workers": 2}


def _normalize_of(preprocess: object) -> T.Normalize:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    raise RobenchError("the backbone's preprocessing has no Normalize step",
                       "fine-tuning needs the tag's mean/std")


def train_transform(backbone: Backbone) -> T.Compose:
    """Random resized crop + flip at the model's resolution, then the tag's normalisation."""
    return T.Compose([T.RandomResizedCrop(backbone.image_size, scale=(0.6, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), _normalize_of(backbone.preprocess)])


class _Labelled(Dataset):
    def __init__(self, source, transform, seed: int, epoch: int) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        # per-(seed, epoch, image) randomness: identical augmentations whatever the worker count
        torch.manual_seed(hash((self.seed, self.epoch, i)) % (2**31))
        return self.transform(self.source.load_image(i)), int(self.source.labels[i])


def context_weights(backbone: Backbone, classnames: list[str], templates: list[str],
                    cache_dir: str | Path) -> torch.Tensor:
    """(D, M) context vectors v_i = normalize(mean_c normalize(g(template_i(c))))."""
    cols = [class_embeddings(backbone, classnames, [t], cache_dir, progress=False).mean(axis=1)
            for t in templates]
    v = torch.tensor(np.stack(cols, axis=1))
    return F.normalize(v, dim=0)


def car_ft_loss(logits: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor,
                feats0: torch.Tensor, ctx: torch.Tensor, scale: float, lam: float,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CE + lambda * KL(p_ctx(theta_0) || p_ctx(theta)); returns (total, kl)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lam == 0:
        return ce, torch.zeros((), device=logits.device)
    logp = F.log_softmax(scale * F.normalize(feats, dim=-1) @ ctx, dim=-1)
    logp0 = F.log_softmax(scale * F.normalize(feats0, dim=-1) @ ctx, dim=-1)
    kl = F.kl_div(logp, logp0, log_target=True, reduction="batchmean")
    return ce + lam * kl, kl


HEAD_FILE = "robench_head.npz"


def finetune(backbone: Backbone, source, templates: list[str], opts: dict, out: Path,
             cache_dir: str | Path, seed: int = 0, progress: bool = True) -> str:
    """Fine-tune ``backbone`` on ``source``; returns the ``local-dir:`` spec of the result.

    The result is an open_clip folder (:func:`robench.models.backbone.save_derived`) that reloads
    with the parent's architecture config and preprocessing, plus the trained head
    (``robench_head.npz``: weight (D, C) and the class names of its label space).
    """
    final = out / "model"
    if intact(final, HEAD_FILE):
        return f"local-dir:{final}"
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = backbone.model
    device = backbone.device
    scale = backbone.logit_scale
    w0 = class_embeddings(backbone, source.classnames, templates, cache_dir, progress)
    head = torch.nn.Parameter(torch.tensor(w0, device=device))
    ctx = context_weights(backbone, source.classnames, templates, cache_dir).to(device) \
        if opts["lam"] else None
    frozen = copy.deepcopy(model.visual).eval() if opts["lam"] else None
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    params = [p for p in model.visual.parameters()] + [head]
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    steps_per_epoch = math.ceil(len(source) / opts["batch_size"])
    total = opts["epochs"] * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < opts["warmup"]:
            return (step + 1) / opts["warmup"]
        return 0.5 * (1 + math.cos(math.pi * (step - opts["warmup"]) /
                                   max(1, total - opts["warmup"])))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = 0
    resume = out / "last_epoch.pt"
    if (state := load_resume(resume, device)) is not None:  # from its last finished epoch
        model.load_state_dict(state["model"])
        head.data.copy_(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["epoch"] + 1
    tf = train_transform(backbone)
    bar = tqdm(total=total, initial=start * steps_per_epoch, unit="step", disable=not progress,
               desc=f"{'car-ft' if opts['lam'] else 'finetune'} {source.name}", leave=False)
    for epoch in range(start, opts["epochs"]):
        model.visual.train()
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = DataLoader(_Labelled(source, tf, seed, epoch), batch_size=opts["batch_size"],
                            shuffle=True, generator=g, num_workers=opts["workers"],
                            drop_last=False)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            feats = model.encode_image(x)
            logits = scale * F.normalize(feats, dim=-1) @ head
            feats0 = None
            if frozen is not None:
                with torch.no_grad():
                    feats0 = frozen(x)
            loss, kl = car_ft_loss(logits, y, feats, feats0, ctx, scale, opts["lam"],
                                   opts["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, opts["grad_clip"])
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.4f}")
            bar.update(1)
        state = {"model": model.state_dict(), "head": head.detach(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "epoch": epoch}
        atomic_write(resume, lambda tmp, s=state: torch.save(s, tmp))
        seal_file(resume)
    bar.close()
    model.eval()
    spec = save_derived(backbone, model.state_dict(), final)
    save_head(final, head.detach().cpu().numpy(), list(source.classnames))
    discard(resume)
    return spec


def load_resume(path: Path, device: str) -> dict | None:
    """The state saved after the last finished epoch, if it is intact (checksum verified, tensors
    only: ``weights_only=True`` never runs code from the cache); a damaged one is removed."""
    if not path.is_file():
        return None
    try:
        verify_file(path)
        return torch.load(path, map_location=device, weights_only=True)
    except (CorruptEntry, RuntimeError, EOFError, ValueError) as e:
        discard(path, reason=f"fine-tuning resume state {path}: {e}")
        return None


def save_head(folder: Path, weight: np.ndarray, classnames: list[str]) -> None:
    """The trained head beside the derived checkpoint; written last, it marks the folder done."""
    write_npz(folder / HEAD_FILE, weight=np.asarray(weight, dtype=np.float32),
              classnames=np.asarray(classnames, dtype=str))


def load_head(pretrained: str) -> tuple[np.ndarray, list[str]]:
    """(weight, class names) of the head saved with a derived ``local-dir:`` checkpoint."""
    folder = Path(pretrained.removeprefix("local-dir:"))
    z = load_npz(folder / HEAD_FILE)
    return z["weight"], [str(c) for c in z["classnames"]]


def options(spec: ModelSpec, lam_default: float) -> dict:
    opts = {**DEFAULTS, "lam": lam_default, **spec.options}
    unknown_keys = set(opts) - set(DEFAULTS)
    if unknown_keys:
        from robench.errors import unknown

        raise unknown("fine-tuning option", sorted(unknown_keys)[0], DEFAULTS)
    if not opts["train_on"]:
        raise RobenchError("fine-tuning needs options.train_on (a labelled ID dataset)",
                           "add options: {train_on: cifar10-subset-probe}")
    return opts


def prepare_finetuned(runner, name: str, spec: ModelSpec, lam_default: float) -> ModelSpec:
    """Train (or reuse) the fine-tuned checkpoint; return a spec that loads it."""
    cfg = runner.cfg
    opts = options(spec, lam_default)
    source = runner.source(opts["train_on"])
    base = load_backbone(spec.arch, spec.pretrained, cfg.device, "fp32",
                         allow_download=cfg.allow_download, seed=cfg.seed)
    templates = runner.templates_for(opts["train_on"])
    ident = {"weights": base.weights_hash, "train": source.manifest_hash, "opts": opts,
             "seed": cfg.seed, "templates": templates, "method": spec.method,
             "arch": base.model_cfg, "format": 2}
    out = artifact_dir(cfg.cache_dir, "finetune", ident)
    with entry_lock(out / "model", f"fine-tuning {name}"):  # concurrent runs train it once
        ckpt = finetune(base, source, templates, opts, out, cfg.cache_dir, seed=cfg.seed,
                        progress=cfg.progress)
    return replace(spec, pretrained=ckpt)


def finetuned_head(ctx, source) -> LinearHead:
    """The fine-tuned head saved with the checkpoint, valid for the label space it was trained
    on."""
    w, classnames = load_head(ctx.spec.pretrained)
    if list(source.classnames) != classnames:
        raise RobenchError(
            f"{ctx.spec.method} head was trained on another label space than {source.name}'s",
            "evaluate fine-tuned models on datasets with the training classes")
    return LinearHead(weight=w, scale=ctx.backbone.logit_scale, classnames=list(source.classnames),
                      info={"head": ctx.spec.method, "logit_scale": ctx.backbone.logit_scale})


def prepare(runner, name: str, spec: ModelSpec) -> ModelSpec:
    return prepare_finetuned(runner, name, spec, lam_default=0.0)


def build(ctx, source) -> LinearHead:
    return finetuned_head(ctx, source)
