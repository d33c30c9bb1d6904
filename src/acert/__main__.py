"""``python -m acert`` (and ``torchrun -m acert``) runs the command line."""

import sys

from acert.cli import main

sys.exit(main())
