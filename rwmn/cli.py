"""Command-line helpers shared by ``train.py`` and ``python -m rwmn.data.synthetic``.

May import: the standard library only.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some library messages span several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is in ``--help``), exit 2.
    ``quiet``: exit 2 without the line (the ranks of a torchrun launch other than 0 parse
    the same command line, so one of them saying it is enough)."""

    def __init__(self, *args, quiet: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def error(self, message: str) -> NoReturn:
        if not self.quiet:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless its text already says it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
