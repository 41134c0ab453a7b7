"""``python -m bench.gpu_session``: the same as ``python -m bench gpu_session``.

May import: bench.gpu_session.session.
"""

import sys

from bench.gpu_session.session import main

if __name__ == "__main__":
    sys.exit(main())
