"""Does CAR-FT's context regulariser see anything? Diagnostics of a checkpoint + template set.

CAR-FT (``robench/models/finetune.py``) keeps the fine-tuned image encoder's distribution over
M context prompts close to the pre-trained one's:

    p_ctx(x; theta) = softmax_i(s * <normalize(f_theta(x)), v_i>),
    v_i = normalize(mean_c normalize(g(template_i(c)))),      (finetune.context_weights)

    KL(x) = KL(p_ctx(x; theta_0) || p_ctx(x; theta))           (finetune.car_ft_loss)

If the text tower cannot tell the templates apart, the v_i coincide, p_ctx is uniform whatever
the image and the KL is ~0 for every theta: the regulariser is inert. This script reports, for a
checkpoint and the template set of the fine-tuning split:

- the context vectors' pairwise cosines (mean over the M(M-1)/2 pairs, min, max);
- the context-KL between the zero-shot encoder theta_0 and the plain fine-tuned encoder, and the
  same for CAR-FT (its ``lam`` as the suite sets it, 1 in the quickstart), mean over the images
  of each evaluated split (clean test split, and the corrupted one with ``--datasets``);
- how far CAR-FT's image tower ends from plain fine-tuning's:
  ||theta_car - theta_ft|| / ||theta_ft - theta_0|| (relative to the fine-tuning displacement)
  and ||theta_car - theta_ft|| / ||theta_ft||.

Everything goes through robench: the suite's model declarations (fine-tuning settings), the
runner (which trains the fine-tuned checkpoints or reuses them from ``cache_dir``), the cached
features, ``finetune.context_weights`` and ``finetune.car_ft_loss``. Examples:

    python scripts/context_diagnostics.py --cache-dir /tmp/diag          # shipped model
    python scripts/context_diagnostics.py --checkpoint old.pt --templates cifar --cache-dir ...
    python scripts/context_diagnostics.py --cache-dir /tmp/diag \
        --datasets cifar10-subset-test cifar10-subset-test-c          # also under corruption

A cache_dir that a ``robench run suite=quickstart`` already filled makes it take seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from robench.config import load_suite
from robench.models.backbone import Backbone, load_backbone
from robench.models.finetune import car_ft_loss, context_weights
from robench.registry import ModelSpec, get_dataset
from robench.runner import Runner


def pairwise_cosines(ctx: torch.Tensor) -> np.ndarray:
    """Cosines <v_i, v_j>, i < j, of the (D, M) unit-norm context vectors."""
    gram = (ctx.T @ ctx).double().numpy()
    return gram[np.triu_indices(gram.shape[0], k=1)]


def context_kl(feats0: np.ndarray, feats: np.ndarray, ctx: torch.Tensor, scale: float) -> float:
    """Mean over images of KL(p_ctx(theta_0) || p_ctx(theta)), computed by CAR-FT's own loss
    (``car_ft_loss`` with lambda = 1 returns the batch-mean KL as its second value)."""
    f0 = torch.tensor(np.asarray(feats0), dtype=torch.float32)  # copies the memory map
    f = torch.tensor(np.asarray(feats), dtype=torch.float32)
    dummy = torch.zeros(len(f), 1)  # the cross-entropy part is not reported
    _, kl = car_ft_loss(dummy, torch.zeros(len(f), dtype=torch.long), f, f0, ctx, scale, lam=1.0)
    return float(kl)


def visual_params(backbone: Backbone) -> torch.Tensor:
    """The image tower's parameters (what fine-tuning trains) as one float64 vector."""
    return torch.cat([p.detach().double().flatten() for p in backbone.model.visual.parameters()])


def find_model(runner: Runner, method: str) -> str:
    names = [n for n, s in runner.models.items() if s.method == method]
    if not names:
        sys.exit(f"the suite declares no '{method}' model")
    return names[0]


def diagnose(suite: str, cache_dir: str, checkpoint: str | None = None,
             templates: str | None = None, datasets: list[str] | None = None,
             device: str = "cpu", overrides: list[str] | None = None) -> dict:
    """The figures above, as a dict (see the module docstring). ``overrides``: more
    ``key=value`` settings of the suite, as ``robench run`` takes them (e.g. ``data_root=``)."""
    cfg = load_suite(suite, [f"cache_dir={cache_dir}", f"device={device}", "progress=false",
                             *(overrides or [])])
    runner = Runner(cfg)
    ft_name, car_name = find_model(runner, "finetune"), find_model(runner, "car-ft")
    if checkpoint is not None:  # every fine-tuning starts from this checkpoint instead
        for name in (ft_name, car_name):
            runner.models[name] = replace(runner.models[name], pretrained=checkpoint)
    ft_spec, car_spec = runner.models[ft_name], runner.models[car_name]
    ft_opts, car_opts = runner.method_of(ft_name).options, runner.method_of(car_name).options
    train_on = ft_opts.train_on
    if car_opts.train_on != train_on or car_spec.pretrained != ft_spec.pretrained:
        sys.exit(f"{ft_name} and {car_name} must start from one checkpoint and train on one "
                 "split to be compared")
    if templates is not None:  # the fine-tuning split's prompts (CAR-FT's contexts) replaced
        runner.dataset_specs[train_on] = replace(get_dataset(train_on), templates=templates)
    template_set = runner.dataset_specs.get(train_on, get_dataset(train_on)).templates
    prompts = runner.templates_for(train_on)

    base = load_backbone(ft_spec.arch, ft_spec.pretrained, device, "fp32",
                         allow_download=cfg.allow_download, seed=cfg.seed)
    ctx = context_weights(base, list(runner.source(train_on).classnames), prompts,
                          cfg.cache_dir)
    cos = pairwise_cosines(ctx)
    tuned = {}
    for label, name in (("finetune", ft_name), ("car-ft", car_name)):
        spec: ModelSpec = runner.prepared(name)  # trains it, or reuses it from the cache
        tuned[label] = load_backbone(spec.arch, spec.pretrained, device, "fp32",
                                     allow_download=cfg.allow_download, seed=cfg.seed)
    scale = base.logit_scale
    kls: dict[str, dict[str, float]] = {}
    for d in datasets or [cfg.id_dataset or cfg.datasets[0]]:
        _, f0 = runner.source_and_features(base, d)
        kls[d] = {label: context_kl(f0.features, runner.source_and_features(bb, d)[1].features,
                                    ctx, scale)
                  for label, bb in tuned.items()}
    w0, wft, wcar = visual_params(base), visual_params(tuned["finetune"]), \
        visual_params(tuned["car-ft"])
    return {
        "suite": cfg.name, "checkpoint": ft_spec.pretrained, "weights_hash": base.weights_hash,
        "template_set": template_set, "n_contexts": len(prompts), "train_on": train_on,
        "logit_scale": scale, "car_ft_lam": car_opts.lam,
        "context_cosine": {"mean": float(cos.mean()), "min": float(cos.min()),
                           "max": float(cos.max())},
        "context_kl": kls,
        "car_vs_ft_distance": {
            "rel_to_ft_displacement": float((wcar - wft).norm() / (wft - w0).norm()),
            "rel_to_ft_weights": float((wcar - wft).norm() / wft.norm()),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="quickstart",
                    help="suite whose finetune and car-ft declarations are used")
    ap.add_argument("--cache-dir", required=True,
                    help="robench cache (fine-tuned checkpoints, features, text vectors)")
    ap.add_argument("--checkpoint", default=None,
                    help="start fine-tuning from this checkpoint instead of the suite's")
    ap.add_argument("--templates", default=None,
                    help="template set of the fine-tuning split (default: the registry's)")
    ap.add_argument("--datasets", nargs="+", default=None,
                    help="splits to measure the KL on (default: the suite's id_dataset)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="suite settings, as robench run takes them (e.g. data_root=/data)")
    args = ap.parse_args()
    out = diagnose(args.suite, args.cache_dir, args.checkpoint, args.templates, args.datasets,
                   args.device, args.overrides)
    c = out["context_cosine"]
    print(f"checkpoint {out['checkpoint']} (weights {out['weights_hash'][:12]}), template set "
          f"'{out['template_set']}' ({out['n_contexts']} contexts), logit scale "
          f"{out['logit_scale']:.2f}")
    print(f"context vectors: pairwise cosine mean {c['mean']:.4f} (min {c['min']:.4f}, "
          f"max {c['max']:.4f})")
    for d, kl in out["context_kl"].items():
        print(f"context-KL(zero-shot || model) on {d}: finetune {kl['finetune']:.3e}, "
              f"car-ft (lam={out['car_ft_lam']:g}) {kl['car-ft']:.3e} "
              f"(ratio {kl['car-ft'] / kl['finetune']:.3f})")
    dist = out["car_vs_ft_distance"]
    print(f"car-ft vs finetune image tower: ||car - ft|| = {dist['rel_to_ft_displacement']:.3f} "
          f"x ||ft - zero-shot|| = {100 * dist['rel_to_ft_weights']:.3f}% of ||ft||")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
