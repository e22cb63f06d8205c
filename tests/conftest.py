"""Test hygiene: Triton's interpreter on CPU, seeded RNG, default dtype restored, TF32 off, hypothesis profiles."""

import os

import pytest
import torch

# Under pytest-xdist each worker takes its share of the cores, it and the processes its tests start (servers, the
# scripts): more threads than cores would make every torch operator wait for threads that are not running.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(_share)

# @triton.jit reads TRITON_INTERPRET when it decorates, so this must run before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import register_random, settings  # noqa: E402


class TorchRandom:
    """torch's global RNG in the shape hypothesis manages: seeded per example, so a failure replays exactly."""

    def seed(self, seed):
        torch.manual_seed(seed)

    def getstate(self):
        return torch.get_rng_state()

    def setstate(self, state):
        torch.set_rng_state(state)


TORCH_RANDOM = TorchRandom()  # hypothesis keeps a weak reference
register_random(TORCH_RANDOM)

# derandomized: the same shapes on every run and machine, so a result is a fact about the code, not about the draw
settings.register_profile("dev", max_examples=10, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))  # CI runs the @given tests again with "ci"

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _hygiene():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, beside the project root (real tokenizer files); skipped with a reason when absent."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"shared test data not found at {os.path.abspath(SHARED)}")
    return SHARED
