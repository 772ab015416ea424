"""Zero-shot head: a prompt ensemble (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", section 3.1.4).

For class c: w_c = normalize(mean_t normalize(text_encoder(template_t(c)))).
Logits = exp(logit_scale) * <normalize(f(x)), w_c>, with the model's own learned scale.

Encoding 1000 classes x 80 templates takes ~95 min for ViT-B-32 on a 2-core CPU, so the class
vectors w_c are cached on disk **per class**: a head for any class list is assembled from cached
vectors and only classes never seen before are encoded. A dataset scored over a sub-list
(ImageNet-R/-A: 200 of 1000) encodes only those classes; a later 1000-class head reuses them.

Cache layout (``<cache_dir>/text/``): one folder per (weights, precision, tokenizer, ordered
template list) -- ``store_key`` -- holding ``meta.json`` (what the vectors are) and a few
shards ``<hash>.npz`` (``names``: class names, ``vectors``: float32 (n, D)). A run that encodes
new classes adds one shard; more than ``MAX_SHARDS`` are merged into one. Every write is atomic
(temporary file + rename) and shards are never modified in place, so concurrent runs never see a
half-written file: at worst two runs encode the same class and both shards hold it. A shard that
fails to load (copied in truncated, disk trouble) is discarded with a warning and its classes are
encoded again.

The per-class vectors are computed exactly as ``open_clip.build_zero_shot_classifier`` does
(tokenise, ``encode_text(normalize=True)``, mean over templates, renormalise), under the
backbone's precision, but with all templates of many classes in one forward pass
(``prompt_budget``). At fp32 on CPU a prompt's embedding does not depend on the other prompts in
its batch once a batch holds more than a dozen prompts (measured; ``tests/test_zeroshot.py``
checks it), so a head assembled from cached vectors is bit for bit open_clip's for the same class
list. Below that size BLAS picks other kernels by thread count and batch size, and on GPUs or at
fp16/bf16 kernels are chosen by shape: there the cache stores whatever the first encoding
computed, and every later head reuses exactly those bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from robench.errors import RobenchError
from robench.io import CorruptEntry, discard, load_npz, read_json, write_json, write_npz
from robench.models.backbone import Backbone
from robench.models.heads import LinearHead
from robench.progress import progress_bar

log = logging.getLogger(__name__)

STORE_VERSION = 1
MAX_SHARDS = 8  # more shards than this in one store are merged into one
MAX_PROMPTS = 2048  # prompts per forward pass, at most (on CPU 4096 was no faster)
CPU_ACTIVATION_BYTES = 2 << 30  # transient activation memory a CPU forward pass may use
GPU_ACTIVATION_CAP = 8 << 30
ACTIVATION_FLOATS = 12  # ~floats per (token, width) alive at the peak of a text block


def text_key(backbone: Backbone, classnames: list[str], templates: list[str]) -> str:
    """Content key of one head's text embeddings (used by methods that key artifacts on it)."""
    ident = json.dumps([backbone.weights_hash, backbone.precision, classnames, templates])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def tokenizer_id(backbone: Backbone) -> str:
    tok = backbone.tokenizer
    return f"{type(tok).__module__}.{type(tok).__qualname__}:{getattr(tok, 'context_length', '')}"


def store_key(backbone: Backbone, templates: Sequence[str]) -> str:
    """What a class vector depends on besides its class name: the weights, the precision they
    run at, the tokenizer, and the ordered templates (the mean's rounding depends on the order)."""
    ident = json.dumps({"format": STORE_VERSION, "weights": backbone.weights_hash,
                        "precision": backbone.precision, "tokenizer": tokenizer_id(backbone),
                        "templates": list(templates)})
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


# -- the per-class store ------------------------------------------------------------------------
STORE_IDENTITY = ("format", "weights_hash", "precision", "tokenizer", "templates")
class TextStore:
    """Per-class text vectors of one (weights, precision, tokenizer, templates) in a folder."""

    def __init__(self, folder: Path, meta: dict | None = None) -> None:
        self.folder = folder
        self.meta = meta

    @classmethod
    def for_backbone(cls, cache_dir: str | Path, backbone: Backbone,
                     templates: Sequence[str]) -> TextStore:
        folder = Path(cache_dir).expanduser() / "text" / store_key(backbone, templates)
        meta = {"format": STORE_VERSION, "arch": backbone.arch, "pretrained": backbone.pretrained,
                "weights_hash": backbone.weights_hash, "precision": backbone.precision,
                "tokenizer": tokenizer_id(backbone), "templates": list(templates)}
        return cls(folder, meta)

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []

    def load(self) -> dict[str, np.ndarray]:
        """Every cached class vector: class name -> float32 (D,)."""
        for _ in range(5):
            try:
                return self._load_once()
            except FileNotFoundError:  # a concurrent run merged shards after we listed them
                continue
        return self._load_once()

    def _load_once(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        dim = None
        if not self._meta_agrees():
            return out
        for path in self.shards():
            try:
                names, vectors = _read_shard(path, dim)
            except FileNotFoundError:
                raise
            except (CorruptEntry, OSError, ValueError, KeyError, EOFError,
                    zipfile.BadZipFile) as e:
                discard(path, reason=f"text cache: shard {path} is unreadable or damaged ({e}); "
                        "its classes are encoded again")
                continue
            dim = vectors.shape[1]
            for name, v in zip(names, vectors, strict=True):
                out.setdefault(name, v)  # duplicates only come from concurrent first runs
        return out

    def _meta_agrees(self) -> bool:
        """The folder's ``meta.json`` describes the store asked for (weights, precision,
        tokenizer, templates) and is sealed to it; otherwise every shard is foreign or
        unverified and is removed (named), so the classes are encoded again."""
        if self.meta is None or not self.shards():
            return True
        path = self.folder / "meta.json"
        try:
            found = read_json(path, bound(path))
            # what the store key is made of; arch / pretrained only describe (the same weights
            # at another path share the store)
            if all(found.get(k) == self.meta[k] for k in STORE_IDENTITY):
                return True
            problem = "describes other weights or templates than the store asked for"
        except CorruptEntry as e:
            problem = e.reason
        discard(path, *self.shards(), reason=f"text cache {self.folder}: meta.json {problem}; "
                "its class vectors are encoded again")
        return False

    def add(self, names: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one new shard atomically; merge the store when it has too many shards."""
        if self.meta is not None and not (self.folder / "meta.json").is_file():
            write_json(self.folder / "meta.json", self.meta, bound=bound(self.folder /
                                                                        "meta.json"))
        path = _write_shard(self.folder, list(names), vectors)
        shards = self.shards()
        if len(shards) > MAX_SHARDS:
            self.compact(shards)
        return path

    def compact(self, shards: list[Path] | None = None) -> None:
        """Merge shards into one. The merged shard is in place before any old one is removed,
        so a concurrent reader always finds every vector."""
        shards = self.shards() if shards is None else shards
        entries = self.load()
        if not entries:
            return
        merged = _write_shard(self.folder, list(entries), np.stack(list(entries.values())))
        for p in shards:
            if p != merged:
                discard(p)


def _shard_name(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24] + ".npz"


def _write_shard(folder: Path, names: list[str], vectors: np.ndarray) -> Path:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ValueError(f"{len(names)} names but vectors of shape {vectors.shape}")
    path = folder / _shard_name(names)
    write_npz(path, bound=bound(path), names=np.asarray(names, dtype=str), vectors=vectors)
    return path


def bound(path: Path) -> str:
    """What a file of the text store is (its seal's binding): ``text/<store key>/<file>``."""
    return f"text/{path.parent.name}/{path.name}"


def _read_shard(path: Path, dim: int | None) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(path)
    z = load_npz(path, bound(path))  # checksum and binding verified (robench.io)
    names, vectors = z["names"].tolist(), z["vectors"]
    if (vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != len(names)
            or (dim is not None and vectors.shape[1] != dim) or not np.isfinite(vectors).all()):
        raise ValueError(f"bad contents: {len(names)} names, vectors {vectors.dtype} "
                         f"{vectors.shape}")
    return names, vectors


# -- encoding -----------------------------------------------------------------------------------
def _text_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(context length, width) of the text tower, with conservative defaults when the tower is
    not open_clip's own transformer (e.g. a Hugging Face text model)."""
    tower = getattr(model, "transformer", None) or getattr(getattr(model, "text", None),
                                                           "transformer", None)
    width = getattr(tower, "width", None) or 1024
    return int(getattr(model, "context_length", None) or 77), int(width)


def prompt_budget(backbone: Backbone) -> int:
    """Prompts per forward pass: as many as fit an activation budget -- on CPU
    ``CPU_ACTIVATION_BYTES``, on CUDA a quarter of the free memory (at most 8 GiB) -- taking
    ``ACTIVATION_FLOATS`` x context x width float32 values per prompt; at most ``MAX_PROMPTS``."""
    ctx, width = _text_shape(backbone.model)
    per_prompt = ACTIVATION_FLOATS * ctx * width * 4
    memory = CPU_ACTIVATION_BYTES
    if str(backbone.device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(backbone.device))
        memory = min(free // 4, GPU_ACTIVATION_CAP)
    return int(max(1, min(MAX_PROMPTS, memory // per_prompt)))


def class_batches(names: Sequence[str], n_templates: int,
                  max_prompts: int) -> list[list[str]]:
    """Whole classes per batch (all their templates together), as many as ``max_prompts``
    allows, at least one."""
    per = max(1, max_prompts // n_templates)
    return [list(names[i:i + per]) for i in range(0, len(names), per)]


def _prefetched(fn: Callable, items: Iterable, background: bool = True) -> Iterator:
    """``fn(item)`` for each item; with ``background`` the next one is computed in a thread while
    the caller works on the current one (tokenising is Python; the encoder releases the GIL)."""
    items = list(items)
    if not items:
        return
    if not background:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(fn, items[0])
        for k in range(len(items)):
            cur = nxt.result()
            if k + 1 < len(items):
                nxt = pool.submit(fn, items[k + 1])
            yield cur


def encode_classes(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                   progress: bool = True, max_prompts: int | None = None) -> np.ndarray:
    """(C, D) float32 prompt-ensemble vectors, no cache: ``open_clip.build_zero_shot_classifier``'s
    arithmetic, many classes per forward pass, a progress bar counting prompts."""
    templates = list(templates)
    batches = class_batches(classnames, len(templates), max_prompts or prompt_budget(backbone))

    def tokenize(batch: list[str]) -> torch.Tensor:
        return backbone.tokenizer([t.format(c) for c in batch for t in templates])

    # Tokenising overlaps encoding only on an accelerator: on CPU both compete for the same
    # cores (measured on 2 cores: ~10-20% slower with the extra thread when the machine is quiet)
    overlap = not str(backbone.device).startswith("cpu")
    out = []
    n_prompts = len(classnames) * len(templates)
    with torch.no_grad(), backbone.autocast(), progress_bar(
            total=n_prompts, unit="prompt", disable=not progress, leave=False,
            desc=f"text head: {len(classnames)} classes x {len(templates)} templates") as bar:
        for batch, tokens in zip(batches, _prefetched(tokenize, batches, overlap), strict=True):
            emb = backbone.model.encode_text(tokens.to(backbone.device), normalize=True)
            emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)
            emb = emb / emb.norm(dim=1, keepdim=True)
            out.append(emb.float().cpu())
            bar.update(len(batch) * len(templates))
    return torch.cat(out).numpy()


def class_embeddings(backbone: Backbone, classnames: list[str], templates: list[str],
                     cache_dir: str | Path, progress: bool = True) -> np.ndarray:
    """(D, C) float32 matrix of normalised class embeddings, column c for ``classnames[c]``:
    cached vectors where present, the other classes encoded (and cached) now."""
    if not classnames or not templates:
        raise RobenchError(f"a zero-shot head needs class names and templates (got "
                           f"{len(classnames)} names, {len(templates)} templates)",
                           "check the dataset's class list and the suite's template set")
    store = TextStore.for_backbone(cache_dir, backbone, templates)
    have = store.load()
    missing = list(dict.fromkeys(c for c in classnames if c not in have))
    if missing:
        log.info("text head: encoding %d of %d classes x %d templates", len(missing),
                 len(set(classnames)), len(templates))
        vectors = encode_classes(backbone, missing, templates, progress)
        store.add(missing, vectors)
        have.update(zip(missing, vectors, strict=True))
    return np.stack([have[c] for c in classnames], axis=1)


def zeroshot_head(backbone: Backbone, classnames: list[str], templates: list[str],
                  template_set: str, cache_dir: str | Path, progress: bool = True,
                  columns: list[int] | None = None) -> LinearHead:
    """The zero-shot classifier for a label space; with ``columns`` (label indices) only those
    classes get a weight column (and only they are encoded)."""
    names = list(classnames) if columns is None else [classnames[int(c)] for c in columns]
    w = class_embeddings(backbone, names, templates, cache_dir, progress)
    return LinearHead(weight=w, scale=backbone.logit_scale, classnames=list(classnames),
                      info={"head": "zeroshot", "template_set": template_set,
                            "n_templates": len(templates), "logit_scale": backbone.logit_scale},
                      columns=None if columns is None else [int(c) for c in columns])
