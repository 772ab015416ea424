"""WiSE-FT: weight-space ensembles of a zero-shot model and its fine-tuned copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from robench.errors import RobenchError
from robench.methods.base import Bench, HeadContext, Method, Options, option

if TYPE_CHECKING:
    from collections.abc import Mapping

    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec


@dataclass(frozen=True)
class WiseFTOptions(Options):
    finetuned: str = option("", "the fine-tuned model of the suite to interpolate with "
                            "(a finetune, car-ft, lp-ft or flyp model)", required=True)
    alpha: float = option(0.5, "mixing weight: 0 is the zero-shot model, 1 the fine-tuned one",
                          minimum=0.0, maximum=1.0)
    alphas: list[float] | None = option(
        None, "one leaderboard model <name>-a<alpha> per value (overrides alpha)",
        minimum=0.0, maximum=1.0)


class WiseFT(Method):
    name = "wise-ft"
    summary = "(1 - alpha) * zero-shot + alpha * fine-tuned weights, head included"
    source = "Wortsman et al. 2022, 'Robust fine-tuning of zero-shot models'"
    Options = WiseFTOptions

    def expand(self, name: str, declared: Mapping[str, Any]) -> list[tuple[str, dict]]:
        """One model per alpha of ``alphas`` (or the single ``alpha``)."""
        opts = dict(declared)
        alphas = opts.pop("alphas", None)
        if alphas is None:
            return [(name, opts)]
        return [(f"{name}-a{a:g}", {**opts, "alpha": float(a)}) for a in alphas]

    def dependencies(self) -> list[str]:
        return [self.options.finetuned]

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        from robench.models.wise_ft import prepare_mix

        ft = self.options.finetuned
        if not bench.method_of(ft).trains_on_images:
            raise RobenchError(f"wise-ft model {name}: {ft} is a {bench.declared(ft).method} "
                               "model, which does not fine-tune the backbone",
                               "set options.finetuned to a finetune, car-ft, lp-ft or flyp "
                               "model")
        return prepare_mix(bench, spec, ft, self.options.alpha)

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        from robench.models.finetune import finetuned_head

        head = finetuned_head(ctx, source)
        head.info.update({"alpha": self.options.alpha, "finetuned": self.options.finetuned})
        return head
