"""A training run's state on disk, in its output directory OUT:

    OUT/run.json                    the settings that define the run (a resume must repeat them)
    OUT/metrics.jsonl               one JSON object per optimizer step
    OUT/checkpoints/step-*.pt       the full training state (model, optimizer, step, RNG) every --save-every steps

Every file is written to a temporary name, flushed, then renamed, so a crash, a kill or a full disk leaves the
previous version as the newest valid one; only the newest `keep` states are kept. Under FSDP the state is gathered
whole on process 0, which alone writes; any process can resume any state (each keeps its own shard). Also here:
OUT/loss.png from the metrics, and what Ctrl-C prints (stop_message: the step reached and the command that resumes).
"""

import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch

from ..atomic import check_replace
from ..checkpoint import replaced_by_save
from ..lora.adapter import ADAPTER_FILES
from . import distributed as dist
from .config import RUN_KEYS

STATE_FILE = re.compile(r"step-(\d{8})\.pt")


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- run.json
def _exported(name: str) -> bool:
    """Whether train.py's export replaces the entry `name` of OUT (the model or the adapter, and the tokenizer)."""
    return replaced_by_save(name) or name in ADAPTER_FILES


def _proven_run(out: Path) -> dict:
    """OUT/run.json, refused unless train.py wrote it: a JSON object with every key of RUN_KEYS."""
    run_file = out / "run.json"
    try:
        saved = json.loads(run_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    missing = [k for k in RUN_KEYS if k not in saved] if isinstance(saved, dict) else None
    if missing is None or missing:
        more = f" and {len(missing) - 3} more" if missing and len(missing) > 3 else ""
        why = "not a JSON object" if missing is None else f"no {', '.join(missing[:3])}{more}"
        raise RunError(f"--out {out} holds a run.json that is not a train.py run's ({why}); choose an empty or new "
                       "directory")
    return saved


def check_out(out: Path, run: dict, resume: bool) -> Path | None:
    """Refuse an OUT that holds another run (or this run without resume), or anything but a train.py run; returns the
    state file to resume from.

    A train.py run is proven by its run.json (_proven_run); the files its export will replace must be as an earlier
    export wrote them (atomic.check_replace: a hand-edited config.json is refused now, not after the run). A directory
    with no saved state and no exported model holds nothing to resume or lose (a run that stopped before its first
    save): a new run may take it over.
    """
    if not (out / "run.json").exists():
        if out.exists() and any(out.iterdir()):
            raise RunError(f"--out {out} is not empty and holds no run.json: it is not a train.py run; "
                           "choose an empty or new directory")
        return None
    saved = _proven_run(out)
    try:
        check_replace(out, replaces=_exported, force=True)
    except FileExistsError as e:
        raise RunError(f"--out {e}") from None
    states = state_files(out / "checkpoints")
    if not states and not (out / "config.json").exists() and not (out / "adapter_config.json").exists():
        return None
    diff = [f"{k}: {saved.get(k)!r} there, {run.get(k)!r} now" for k in dict.fromkeys([*run, *saved])
            if saved.get(k) != run.get(k)]  # both ways: a LoRA run's keys are absent from a full fine-tuning run's
    if diff:
        raise RunError(f"--out {out} holds a different run ({'; '.join(diff)}); use another --out")
    if states and not resume:
        raise RunError(f"--out {out} already holds this run (last checkpoint {states[-1].name}); "
                       "add --resume to continue it, or choose another --out")
    return states[-1] if resume and states else None


def read_run(out: Path) -> dict:
    """The settings run.json recorded in OUT; {} when there is none (or it cannot be read: check_out says why)."""
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def nothing_to_resume(out: Path) -> str:
    """Why --resume cannot go on in an OUT that check_out found no state in (a usage error: a typo in --out?)."""
    found = "holds no saved training state" if out.exists() else "does not exist"
    return f"--resume: --out {out} {found}, so there is nothing to resume; without --resume the run starts from step 0"


def write_run(out: Path, run: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "run.json", json.dumps(run, indent=2) + "\n")


def _write_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(file)


def command_line(resume: bool) -> str:
    """The command that started this run as the user typed it, shell-quoted, with --resume added (resume) or taken
    out: sys.orig_argv (the interpreter and the script as typed); under torchrun, whose processes run
    `python -u SCRIPT ...`, a torchrun launch of sys.argv."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        argv = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", *sys.argv]
    else:
        argv = list(sys.orig_argv)
    argv = [a for a in argv if a != "--resume"] + (["--resume"] if resume else [])
    return shlex.join(argv)


def stop_message(out: Path, step: int) -> str:
    """What Ctrl-C prints: the step reached, the newest saved state and the command that continues from it (or,
    with none saved, starts the run again)."""
    states = state_files(out / "checkpoints")
    torchrun = " (under torchrun: with your other torchrun options, on any number of processes)" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    if not states:
        return f"stopped at step {step}, before any state was saved; start again with: {command_line(False)}{torchrun}"
    saved = int(STATE_FILE.fullmatch(states[-1].name).group(1))
    step = max(step, saved)  # stopped while a resumed run was loading: it had reached its saved state
    return f"stopped at step {step} (last state saved at step {saved}); resume with: {command_line(True)}{torchrun}"


# ------------------------------------------------------------------------------------------------ metrics.jsonl
def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(out: Path) -> list[dict]:
    file = out / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the rows up to `step`: those a killed run logged after its last checkpoint would be there twice."""
    rows = [r for r in read_metrics(out) if r["step"] <= step]
    _write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def plot_losses(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (train loss per step, validation loss where measured); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / token)", title=out.name)
    ax.legend()
    fig.tight_layout()
    tmp = out / f".loss-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return tmp.replace(out / "loss.png")


# ------------------------------------------------------------------------------------------------ state files
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


# ------------------------------------------------------------------------------------------- gather and restore
def full_state(model, optimizer=None, *, trainable_only=False):
    """(model, optimizer) state dicts gathered whole on the CPU of process 0 (other processes get empty dicts).
    trainable_only: only the parameters that train (LoRA's adapters; the frozen base is the run's --init)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def restore(model, optimizer, state, *, trainable_only=False) -> None:
    """Load a whole saved state (model, optimizer, RNG); under FSDP each process keeps its own shard of every tensor.
    The RNG is process 0's stream; the others' only drive dropout, which Pythia and Dolly do not use.
    trainable_only: the state holds exactly the parameters that train (see full_state), the rest is kept."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if trainable_only:
        wanted = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state["model"]) != wanted:
            odd = sorted(set(state["model"]) ^ wanted)
            raise RunError(f"the saved state's trainable tensors differ from this run's ({', '.join(odd[:3])}...)")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=not trainable_only))
    set_rng_state(state["rng"])


def save(model, optimizer, out: Path, step: int, rank: int, keep: int, device, *, trainable_only=False) -> None:
    """The full training state of `step`, gathered and written by process 0; every process raises if that fails."""
    model_state, optim_state = full_state(model, optimizer, trainable_only=trainable_only)
    error = None
    if rank == 0:
        try:
            save_state(out / "checkpoints", step, {"step": step, "model": model_state, "optimizer": optim_state,
                                                   "rng": rng_state()}, keep=keep)
        except OSError as e:
            error = e
    if dist.all_sum([error is not None], device)[0]:  # doubles as the barrier
        raise error or RunError(f"step {step}: process 0 could not save the training state")
