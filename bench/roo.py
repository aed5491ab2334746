"""ROO vs impression-level training benchmark; same as `sterling bench roo` (see sterling/bench/roo.py)."""

import sys

from sterling.cli import main

sys.exit(main(["bench", "roo", *sys.argv[1:]]))
