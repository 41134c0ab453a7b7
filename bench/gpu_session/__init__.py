"""One command that checks and measures everything on a GPU, within a time budget.

    python -m bench gpu_session [--out DIR]      # CUDA: at most 7 minutes
    python -m bench gpu_session --part sweep      # the size sweeps
    python -m bench gpu_session --smoke           # CPU, tiny, < 1 minute

A GPU is lent to this project only now and then, so its time goes to measuring, not to
setting up: the command needs nothing but torch, triton, numpy, h5py and pytest (plots
are drawn when matplotlib is there too), and in order

1. prints the device, driver, torch/triton/CUDA versions and the git commit;
2. measures the card's ceilings once: device-to-device copy bandwidth, bf16, fp32 and TF32
   matmul FLOP/s (bench.timing);
3. starts the CUDA-marked tests (``pytest -m cuda``) in a subprocess, and compile warmers:
   subprocesses that compile every torch.compile case of the timing sections first, so the
   timed process finds inductor's on-disk caches warm (neither times anything);
4. checks every fused op at the model's sizes, and the whole model, against the reference
   and float64 (bench.checks), while those run;
5. takes the GPU census, still while those run: one training step per configuration
   under torch.profiler, its device kernels by kind against bench.census's CPU count of
   the same step (bench.gpu_session.kernel_census);
6. collects the tests' verdicts (per test, from their JUnit XML), waits for the warmers;
7. alone on the device, times the ops (bench.harness: eager reference, torch.compile'd
   reference, fused), the input pipeline (bench.pipeline) and the training step
   (bench.e2e: eager; the fused step replayed from CUDA graphs; the reference compiled
   with max-autotune in bf16, the baseline; compiled; reduce-overhead);
8. writes ``<device>-<date>.json`` and ``.md`` and PNG plots (bench.report), and prints a
   summary of at most 40 lines.

Every case runs in its own guard: an error becomes its row (error type and first line;
the JSON keeps the traceback), and the run goes on. Each section has a deadline within the
budget (``Budget``); a case that cannot start in time is skipped with that reason, and a
case that overruns its share is stopped (``CaseTimeout``). The JSON is rewritten after
every case, so a run cut short still leaves its results.

``--smoke`` runs the same code on the CPU at the tiny smoke sizes: the fused kernels on the
Triton interpreter (fp32 only: it has no bf16 or fp16), torch.compile with the cheap
``aot_eager`` backend, compiled fused cases skipped (an interpreted kernel cannot be
compiled), the CUDA-graph steps skipped (their rows say so), and in the census the profiled
step's CPU ops standing in for the kernels a CPU does not launch. It is part of CI, so the
command is known to work before a GPU is at hand. Smoke figures are CPU figures and
labelled so.

The package: :mod:`~bench.gpu_session.config` (the presets and the command line),
:mod:`~bench.gpu_session.procs` (the test and warmer subprocesses),
:mod:`~bench.gpu_session.kernel_census` (the profiled step's kernels against the CPU
census), :mod:`~bench.gpu_session.report` (summary, markdown, plots) and
:mod:`~bench.gpu_session.session` (the guarded case runner, the sections, ``main``); each
imports only those listed before it, bench's measuring modules, rwmn and kernels.
"""
