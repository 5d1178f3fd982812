"""``python -m tfp_kernels`` runs the ``tfp-pack`` command line."""

import sys

from .cli import main

sys.exit(main())
