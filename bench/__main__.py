"""``python -m bench <command> [args]``: the one entry point of bench/ (bench/cli.py).

May import: bench.cli.
"""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
