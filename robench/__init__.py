"""robench: robustness benchmark suite for CLIP models.

Data flows suite -> runner -> backbone -> features (cached) -> heads -> metrics -> records ->
report/check; each step lives in its own module (see README).
"""

__version__ = "0.1.0"
