"""HTTP serving load test; same as `sterling bench serve` (see sterling/bench/serve.py)."""

import sys

from sterling.cli import main

sys.exit(main(["bench", "serve", *sys.argv[1:]]))
