"""The command line of bench/: its commands, their parsers, and ``python -m bench <command>``.

Each command is a module (or package) of bench/ with a ``main(argv) -> int``;
``python -m bench --help`` lists them with the first line of each one's docstring, and
``python -m bench <command> --help`` gives the command's own options.
``python -m bench.<command>`` runs the same ``main``, and :func:`parser` gives every
command its argument parser. May import: the command modules, lazily (only the one named,
when it runs); they import this module for :func:`parser`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

#: The commands, in the order ``--help`` lists them: ``bench.<command>`` is documented by
#: its docstring, and its ``main`` is in the module named here.
COMMANDS = {
    "gpu_session": "bench.gpu_session.session",
    "run": "bench.run",
    "e2e": "bench.e2e",
    "report": "bench.report",
    "census": "bench.census",
    "compile_report": "bench.compile_report",
    "data": "bench.data",
    "ddp": "bench.ddp",
    "nvtx_overhead": "bench.nvtx_overhead",
}
USAGE = "usage: python -m bench <command> [args]   (python -m bench <command> --help)"


def parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``python -m bench <command>``: its usage line names the single
    entry point; ``description`` (the module's docstring, or its first paragraph) is shown
    as written."""
    return argparse.ArgumentParser(
        prog=f"python -m bench {command}",
        description=description,
        formatter_class=argparse.RawTextHelpFormatter,
    )


def summary(command: str) -> str:
    """The first line of the command module's docstring, read without importing it (the
    modules import torch)."""
    spec = importlib.util.find_spec(f"bench.{command}")
    with open(spec.origin, encoding="utf-8") as source:
        doc = ast.get_docstring(ast.parse(source.read())) or ""
    return doc.split("\n", 1)[0]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {command:<{width}}  {summary(command)}" for command in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m bench: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest)
