"""The environment of a user's shell, for tests that run a documented command.

The test process itself runs with TRITON_INTERPRET=1 (tests/conftest.py) and the checkout on
sys.path; a user who types ``python -m bench gpu_session --smoke`` in the checkout has
neither. A command tested with the test process's environment could pass here and fail for
that user (an entry point that sets TRITON_INTERPRET too late, after triton's decorators
ran), so documented commands run with this environment instead.
"""

from __future__ import annotations

import os

#: Set by the test process, never by a user's shell.
TEST_ONLY = ("TRITON_INTERPRET", "PYTHONPATH")


def user_env(**extra: str) -> dict[str, str]:
    """os.environ without the test process's own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY}
    env.update(extra)
    return env
