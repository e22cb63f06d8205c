"""Kernel tests: one fixed launch config on GPU (GPTNEOX_AUTOTUNE=0), so each new head size compiles once instead of
autotuning for minutes; set before any test module imports the kernels. Benchmarks autotune."""

import os

os.environ.setdefault("GPTNEOX_AUTOTUNE", "0")
