"""Index-as-model quality table; same as `sterling bench retrieval` (see sterling/bench/retrieval.py)."""

import sys

from sterling.cli import main

sys.exit(main(["bench", "retrieval", *sys.argv[1:]]))
