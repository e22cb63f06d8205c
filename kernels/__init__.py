"""Triton kernels for GPT-NeoX (fused partial rotary, flash attention), installed as `gptneox.kernels`.

This folder is a top-level directory of the repository, but the wheel maps it to the package `gptneox.kernels`
(setup.py `package_dir`), so an installed gptneox never shadows, and is never shadowed by, the unrelated PyPI
distribution named `kernels`. Imports inside this package are relative for that reason.

The reference for every kernel is the torch path in gptneox/ops.py. The kernels themselves arrive with the
Triton kernels issue; until then `gptneox.ops` uses the torch path only.
"""
