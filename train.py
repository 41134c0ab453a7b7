"""Train or evaluate RWMN: ``python train.py --help``."""

import sys

from rwmn.training import main

if __name__ == "__main__":
    sys.exit(main())
