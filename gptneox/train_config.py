"""One training run's settings: TrainConfig, with Dolly v2's recipe as its defaults, checked before any work.

Every field is checked when the config is made (a range per field, named by its train.py flag), before a model is
loaded or a file written. Fields left None were not given: their defaults then adapt to what was given (the batch
split to the number of processes, the run's length to --max-steps), so that only values the user set can
contradict each other. The recipe: docs/architecture.md, "Dolly v2".
"""

import math
from dataclasses import asdict, dataclass

from .cli import UsageError
from .schedule import SCHEDULES

DOLLY_EPOCHS = 2  # databrickslabs/dolly train_dolly.py
DOLLY_BATCH = 48  # 6 per A100 x 8 GPUs
DOLLY_MICRO_BATCH = 6  # per-device batch on an A100 (train_dolly.py)
DOLLY_WARMUP = 50  # warmup steps of Dolly's DeepSpeed WarmupLR (train_dolly.py), 8% of its ~620-step 2-epoch run
DOLLY_LR = 5e-6  # full fine-tuning (train_dolly.py)
# LoRA runs (docs/training.md, "LoRA and QLoRA"): QLoRA's lr for models up to 13B (Dettmers et al. 2023, appendix
# B.2: 2e-4 for 7B and 13B, 1e-4 for 33B and 65B); alpha = 2 r and dropout 0.05, litgpt's LoRA defaults (r 8,
# alpha 16, dropout 0.05)
LORA_LR, LORA_DROPOUT, LORA_TARGETS = 2e-4, 0.05, "query,key,value"
QUANTIZE_MODES = ("int8", "int4")
# the settings that define a run: a resumed run must repeat them, and an --out holding other values is refused
RUN_KEYS = ("init", "config", "tokenizer", "data", "epochs", "max_steps", "val_size", "batch_size", "lr",
            "warmup_steps", "schedule", "weight_decay", "grad_clip", "seq_len", "seed", "dtype", "skip_bad_lines")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quantize_base")  # in run.json of LoRA runs
LORA_FLAGS = ("lora_alpha", "lora_dropout", "lora_targets", "export_merged", "quantize_base")  # need --lora-r


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    data: str  # "dolly-15k", a .jsonl of instruction records, or .txt / .bin / .npy pretraining tokens
    out: str  # the run directory
    init: str | None = None  # checkpoint to fine-tune ...
    config: str | None = None  # ... or a preset / config.json to pretrain from random weights
    tokenizer: str | None = None
    epochs: int | None = None  # default DOLLY_EPOCHS, unless max_steps sets the length
    max_steps: int | None = None
    val_size: int | None = None  # default data.default_val_size
    batch_size: int | None = None  # global, in examples; default DOLLY_BATCH
    micro_batch_size: int | None = None  # per forward and process; default: the largest divisor <= 6 that fits
    lr: float | None = None  # default DOLLY_LR, or LORA_LR with lora_r
    warmup_steps: int | None = None  # default DOLLY_WARMUP, at most a tenth of the run
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    seq_len: int | None = None  # default: the model's context
    seed: int = 42
    save_every: int = 200  # 0 = only at the end
    keep: int = 3  # 0 = keep every state
    eval_every: int = 50  # 0 = never
    sample_every: int | None = None  # default eval_every
    resume: bool = False
    device: str | None = None
    dtype: str | None = None  # bf16 (autocast) or fp32; default bf16 on CUDA, fp32 elsewhere
    compile: bool = False
    grad_checkpointing: bool = False
    skip_bad_lines: bool = False
    progress: bool = True
    lora_r: int = 0  # 0: full fine-tuning; else the rank of LoRA adapters on a frozen base
    lora_alpha: float | None = None  # default 2 * lora_r
    lora_dropout: float | None = None  # default LORA_DROPOUT
    lora_targets: str | None = None  # comma-separated lora.TARGETS; default LORA_TARGETS
    export_merged: bool = False  # LoRA: also write the merged model (HF layout) to OUT/merged
    quantize_base: str | None = None  # QLoRA: hold the frozen base in int8 or int4 (gptneox.quantize)

    def __post_init__(self):
        if self.lr is None:  # the one default resolved here: a LoRA run's differs (run.json records the value)
            object.__setattr__(self, "lr", LORA_LR if self.lora_r else DOLLY_LR)
        for problem in self._problems():
            raise UsageError(problem)

    def _problems(self):
        if (self.init is None) == (self.config is None):
            yield "give exactly one of --init (a checkpoint to fine-tune) or --config (a preset, random init)"
        if self.epochs is not None and self.max_steps is not None:
            yield "give --epochs or --max-steps, not both: each sets the run's length"
        at_least = dict(epochs=1, max_steps=1, val_size=0, batch_size=1, micro_batch_size=1, warmup_steps=0,
                        seq_len=2, save_every=0, keep=0, eval_every=0, sample_every=0)
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                yield f"{flag(name)} must be an integer >= {low}, got {value!r}"
        for name, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("grad_clip", 0.0, False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or strict and value == low:
                yield f"{flag(name)} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}"
        if self.schedule not in SCHEDULES:
            yield f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
        if self.dtype not in (None, "bf16", "fp32"):
            yield (f"--dtype {self.dtype}: training runs in bf16 (autocast over fp32 master weights) or fp32; fp16 "
                   "would need loss scaling")
        if not isinstance(self.seed, int):
            yield f"--seed must be an integer, got {self.seed!r}"
        yield from self._lora_problems()

    def _lora_problems(self):
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            yield f"--lora-r must be an integer >= 0 (0 = full fine-tuning), got {self.lora_r!r}"
            return
        given = [flag(k) for k in LORA_FLAGS if getattr(self, k) not in (None, False)]
        if not self.lora_r and given:
            yield f"{', '.join(given)} need(s) LoRA: add --lora-r R (R > 0; 0, the default, is full fine-tuning)"
        if self.quantize_base not in (None, *QUANTIZE_MODES):
            yield f"--quantize-base {self.quantize_base!r}: choose one of {', '.join(QUANTIZE_MODES)}"
        if self.lora_r:
            try:
                self.lora
            except ValueError as e:
                yield f"--lora-*: {e}"

    @property
    def lora(self):
        """The run's lora.LoRAConfig (defaults resolved), or None for full fine-tuning."""
        if not self.lora_r:
            return None
        from .lora import LoRAConfig
        return LoRAConfig(self.lora_r, 2 * self.lora_r if self.lora_alpha is None else self.lora_alpha,
                          LORA_DROPOUT if self.lora_dropout is None else self.lora_dropout,
                          self.lora_targets or LORA_TARGETS)

    @property
    def run_length(self) -> tuple[int | None, int | None]:
        """(epochs, max_steps): the one given, else Dolly's 2 epochs."""
        return (DOLLY_EPOCHS if self.epochs is None and self.max_steps is None else self.epochs), self.max_steps

    def batches(self, world: int) -> tuple[int, int]:
        """(global batch, micro-batch per process) for `world` processes. A default adapts to what was given: the
        micro-batch is the largest divisor of the per-process batch that is at most Dolly's 6, and the default global
        batch is the multiple of micro x world nearest to Dolly's 48."""
        batch, micro = self.batch_size, self.micro_batch_size
        if batch is None:
            unit = (micro or 1) * world
            batch = max(1, round(DOLLY_BATCH / unit)) * unit
        if batch % world:
            raise UsageError(f"--batch-size {batch} must be a multiple of the {world} processes")
        if micro is None:
            micro = max(d for d in range(1, min(DOLLY_MICRO_BATCH, batch // world) + 1) if (batch // world) % d == 0)
        if batch % (micro * world):
            raise UsageError(f"--batch-size {batch} must be a multiple of --micro-batch-size {micro} x {world} "
                             "process(es)")
        return batch, micro

    def warmup(self, total_steps: int) -> int:
        """Warmup steps: the ones given, else Dolly's 50 but never more than a tenth of the run, so that a short run
        (--max-steps 20, or a small dataset) still reaches its --lr (Dolly's own run is ~620 steps: 50 is 8%)."""
        return self.warmup_steps if self.warmup_steps is not None else min(DOLLY_WARMUP, total_steps // 10)

    @property
    def every_sample(self) -> int:
        return self.eval_every if self.sample_every is None else self.sample_every

    def run_settings(self, *, dtype: str, batch_size: int) -> dict:
        """The settings that define the run (RUN_KEYS), as resolved: what run.json holds and a resume must repeat."""
        epochs, max_steps = self.run_length
        settings = {**asdict(self), "epochs": epochs, "max_steps": max_steps, "dtype": dtype, "batch_size": batch_size}
        lora = self.lora
        if lora:  # resolved; a full fine-tuning run's run.json has none of these keys (as before LoRA existed)
            settings.update(lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_targets=",".join(lora.targets))
        return {k: settings[k] for k in RUN_KEYS + (LORA_KEYS if lora else ())}
