"""Filtered top-k benchmark; same as `sterling bench ann` (see sterling/bench/ann.py)."""

import sys

from sterling.cli import main

sys.exit(main(["bench", "ann", *sys.argv[1:]]))
