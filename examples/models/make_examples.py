"""Generate the example models and inputs in this folder.

    python examples/models/make_examples.py [OUTDIR]

The models live in the package (:mod:`jaccli.cli.example_models`), so that ``jaccli
example NAME|all [DIR]`` writes the same files for users who installed jaccli from the
index; this script is the repository's way to regenerate its copies. Its names are also
``--arch`` factories (``--arch examples/models/make_examples.py:pinn``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaccli.cli.example_models import (  # noqa: F401  (re-exported for --arch and the tests)
    HERE,
    Decay,
    DampedOscillator,
    Heat,
    Potential,
    SmallCNN,
    SmallTransformer,
    VectorField,
    examples,
    main,
    pinn,
    save,
    save_export,
    save_torchscript,
    save_weights,
)

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
