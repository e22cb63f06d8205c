"""Learning-rate schedules: Dolly's warmup-then-constant, and warmup-then-cosine for pretraining.

"constant" is DeepSpeed's WarmupLR as Dolly configured it (config/a100_config.json: warmup_min_lr 0, warmup_type
"log" by default): lr * log(step + 1) / log(warmup_steps) during warmup, then lr, never decayed. DeepSpeed clamps
the warmup to at least 2 steps so the log is defined; so do we. "cosine" is nanoGPT's: linear warmup, then a
half cosine from lr down to lr * min_lr_ratio at the last step.
"""

import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str = "constant",
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of max_steps steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if schedule == "constant":
        if warmup_steps <= 0 or step >= max(2, warmup_steps):
            return lr
        return lr * math.log(step + 1) / math.log(max(2, warmup_steps))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
