"""Temperature scaling of any method's head (Guo et al. 2017), fitted on a validation split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from robench.errors import RobenchError
from robench.methods.base import Bench, HeadContext, Method, Options, option

if TYPE_CHECKING:
    from robench.data.base import ImageSource
    from robench.models.heads import LinearHead
    from robench.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemperatureOptions(Options):
    base: str = option("zeroshot", "the method whose head is calibrated (any robench method)")
    base_options: dict[str, Any] = option({}, "that method's options (checked as its own)")
    calibrate_on: str = option("", "labelled validation split on which T is fitted (NLL)",
                               role="calibrate", required=True)


class TemperatureScaling(Method):
    """The base method's head with its logits divided by one fitted T > 0."""

    name = "temperature-scaling"
    summary = "divides a base method's logits by one T fitted on a validation split's NLL"
    source = "Guo et al. 2017, section 4.2 (robench.models.temperature)"
    Options = TemperatureOptions
    options: TemperatureOptions

    def __init__(self, options: TemperatureOptions, model: str = "?") -> None:
        from robench.methods import make_method  # the registry imports this module

        super().__init__(options, model)
        if self.options.base == self.name:
            raise RobenchError(f"model {self.model}: temperature-scaling cannot wrap itself",
                               "set options.base to the method to calibrate")
        try:
            self.base = make_method(self.options.base, self.options.base_options, self.model)
        except RobenchError as e:  # name the option the error is in
            raise RobenchError(f"{e.problem} (in options.base / base_options)", e.fix) from None

    def base_spec(self, spec: ModelSpec) -> ModelSpec:
        """The wrapped model's spec: same backbone, the base method and its options."""
        return replace(spec, method=self.base.name, options=dict(self.options.base_options))

    @property
    def changes_backbone(self) -> bool:
        """Only as its base does: :meth:`prepare` just forwards to the base's."""
        return self.base.changes_backbone

    def data_roles(self) -> list[tuple[str, str]]:
        return [*self.options.data_roles().items(), *self.base.data_roles()]

    def dependencies(self) -> list[str]:
        return self.base.dependencies()

    def feature_datasets(self) -> list[str]:
        return [self.options.calibrate_on, *self.base.feature_datasets()]

    def fitted_on(self) -> set[str]:
        return self.base.fitted_on()

    def prepare(self, bench: Bench, name: str, spec: ModelSpec) -> ModelSpec:
        """A backbone-changing base (finetune, car-ft, wise-ft) trains or reuses its checkpoint;
        this model loads it."""
        ready = self.base.prepare(bench, name, self.base_spec(spec))
        return replace(spec, arch=ready.arch, pretrained=ready.pretrained)

    def build(self, ctx: HeadContext, source: ImageSource) -> LinearHead:
        """The base head, with its scale divided by T fitted on ``calibrate_on``."""
        import numpy as np

        from robench.models.heads import LinearHead
        from robench.models.temperature import fit_temperature, nll
        from robench.scoring import scored_columns

        cal = self.options.calibrate_on
        base_ctx = replace(ctx, spec=self.base_spec(ctx.spec))
        head = self.base.build(base_ctx, source)
        val_src, val_feats = ctx.features(cal)
        if list(val_src.classnames) != list(head.classnames):
            raise RobenchError(
                f"temperature-scaling: {cal} has another label space than the "
                f"{self.base.name} head for {source.name}",
                "calibrate on a validation split with the evaluated dataset's classes")
        if cal in self.base.fitted_on():
            log.warning("temperature-scaling of %s: %s is also data the base head was trained "
                        "on, so T fitted there under-corrects over-confidence (for "
                        "linear-probe use refit: train, or calibrate on another split)",
                        self.base.name, cal)
        columns, labels = scored_columns(val_src)
        # a head built over the evaluated set's sub-list only (zero-shot for ImageNet-R) has
        # no columns for the rest of a validation split's classes: T is fitted with the base
        # head built for that split, i.e. the T the full head gets
        val_head = head if head.can_score(columns) else self.base.build(base_ctx, val_src)
        logits = val_head.restricted(columns).logits(val_feats.features)
        keep = np.ones(len(labels), dtype=bool)
        keep[val_feats.bad] = False
        logits, labels = logits[keep], labels[keep]
        t = fit_temperature(logits, labels)
        info = {**head.info, "base_method": self.base.name,
                "calibration": "temperature-scaling", "temperature": t, "calibrate_on": cal,
                "calibration_nll_before": nll(logits, labels),
                "calibration_nll_after": nll(logits, labels, t)}
        return LinearHead(weight=head.weight, scale=head.scale / t,
                          classnames=list(head.classnames), bias=head.bias, info=info,
                          columns=head.columns)
