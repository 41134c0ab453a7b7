"""bench/: measures the ops and the training step, checks them, and writes what it measured.

One entry point, ``python -m bench <command> [args]`` (bench/cli.py; ``python -m bench
--help`` lists the commands). Its modules may import rwmn, kernels and the test support
modules tests/gpu_semantics.py and tests/tolerances.py; nothing in rwmn, kernels or the test
support imports bench.
"""
