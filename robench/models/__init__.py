"""Backbones (open_clip) and the methods that turn a backbone into a classifier.

``METHODS`` maps a model spec's ``method`` to the module that builds it; adding a method is one
module plus one line here.
"""

METHODS: dict[str, str] = {
    "zeroshot": "robench.models.zeroshot",
    "finetune": "robench.models.finetune",
    "car-ft": "robench.models.car_ft",
    "wise-ft": "robench.models.wise_ft",
    "linear-probe": "robench.models.linear_probe",
    "lp-clip": "robench.models.lp_clip",
    "temperature-scaling": "robench.models.temperature",
    "classifier": "robench.models.classifier",  # robench.CustomModel(classifier=...)
}
