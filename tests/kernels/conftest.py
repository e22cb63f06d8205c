"""Kernel tests: one fixed launch config per kernel on GPU (GPTNEOX_AUTOTUNE=0: the default config, fp32 its own), so
each new head size and dtype compiles once instead of autotuning for minutes; set before any test runs a kernel.
Benchmarks autotune (benchmarks/gpu_check.py with GPTNEOX_AUTOTUNE=quick)."""

import os

os.environ.setdefault("GPTNEOX_AUTOTUNE", "0")
