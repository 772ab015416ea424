"""``python -m robench ...``: the command line, so that launchers which take a module run it
(``torchrun -m robench run ...``, ``srun python -m robench ...``)."""

from __future__ import annotations

import sys

from robench.cli import main

if __name__ == "__main__":
    sys.exit(main())
