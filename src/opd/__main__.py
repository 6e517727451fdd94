"""``python -m opd`` (and ``accelerate launch -m opd ...``, ``torchrun -m opd ...``): the ``opd`` command."""

import sys

from opd.cli import main

sys.exit(main())
