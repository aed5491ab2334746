"""``python -m sterling`` runs the ``sterling`` command."""

import sys

from sterling.cli import main

sys.exit(main())
