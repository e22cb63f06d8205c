"""The full training state on disk: model, optimizer, step, RNG; one file per saved step, written atomically.

Files are OUT/checkpoints/step-00000200.pt. Each is written to a temporary name, flushed to disk, then renamed,
so a crash, a kill or a full disk during a save leaves the previous checkpoint as the newest valid one. Only the
newest `keep` files are kept.
"""

import os
import re
from pathlib import Path

import torch

STATE_FILE = re.compile(r"step-(\d{8})\.pt")


def state_files(directory) -> list[Path]:
    """Saved states in directory, oldest first (temporary files of an interrupted save are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if STATE_FILE.fullmatch(p.name))


def save_state(directory, step: int, state: dict, *, keep: int = 3) -> Path:
    """Write state as directory/step-{step:08d}.pt atomically, then delete all but the newest `keep` states."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"step-{step:08d}.pt"
    tmp = directory / f".{file.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(file)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"saving the training state of step {step} to {file} failed ({e.strerror or e}); "
                                   "the previous checkpoint is untouched") from e
        raise
    for old in state_files(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return file


def load_state(file) -> dict:
    """A saved training state, memory-mapped: processes that read the same file share its pages."""
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a truncated zip or pickle: name the file
        raise ValueError(f"{file}: unreadable training state ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
