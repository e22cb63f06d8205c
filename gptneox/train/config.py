"""One training run's settings: TrainConfig, with Dolly v2's recipe as its defaults when fine-tuning and Pythia's
when pretraining, checked before any work; train.py's command line is built from it (parser).

Each field is written once with its train.py flag (flag: default, help text, --help section, check): parser() builds
the command line from the fields, and TrainConfig applies the same checks to values given in Python, each message
naming the flag. check_paths checks every path before a model is loaded or a file written. Fields left None were not
given: their defaults then adapt to what was given (the batch split to the number of processes, the run's
length to --max-steps, the learning rate to the kind of run and the model's size: resolve), so that only values the
user set can contradict each other. The recipes: docs/architecture.md, "Dolly v2", and docs/training.md, "Settings,
defaults, and bad values".
"""

import math
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from pathlib import Path

from ..checkpoint import quantization_settings
from ..cli import ArgumentParser, UsageError, add_threads_flag, device_arg, dtype_arg, non_negative_int, positive_int
from ..config import HUB_IDS, PRESETS, Config
from ..hub import parse_name
from ..lora.layers import LoRAConfig
from ..quant.linear import LORA_POINTER
from .data import DATA_FILES, DOLLY_15K, is_instruction_data, needs_tokenizer, steps_per_epoch
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
# Pretraining from scratch (--config): Pythia's peak lr per size (Biderman et al. 2023, arXiv:2304.01373, table 1;
# EleutherAI/pythia models/1B/pythia-1b.yml says 2.5e-4 where the paper says 3e-4), a model of another size taking
# that of the nearest by parameter count (models/14M/pythia-14m.yml also has 1e-3). Pythia warmed up linearly for 1%
# of its 143000 steps ("warmup": 0.01, "train-iters": 143000 in models/*/*.yml), then decayed by cosine to a tenth
# ("min_lr" = lr / 10): our "cosine" schedule. docs/training.md, "Settings, defaults, and bad values".
PYTHIA_LR = {"pythia-70m": 1e-3, "pythia-160m": 6e-4, "pythia-410m": 3e-4, "pythia-1b": 3e-4, "pythia-1.4b": 2e-4,
             "pythia-2.8b": 1.6e-4, "pythia-6.9b": 1.2e-4, "pythia-12b": 1.2e-4}
PYTHIA_WARMUP, PYTHIA_SCHEDULE, DOLLY_SCHEDULE = 1430, "cosine", "constant"
QUANTIZE_MODES = ("int8", "int4")
TRAIN_DTYPES = ("bf16", "fp32")
# the settings that define a run: a resumed run must repeat them, and an --out holding other values is refused
RUN_KEYS = ("init", "config", "tokenizer", "data", "epochs", "max_steps", "val_size", "batch_size", "lr",
            "warmup_steps", "schedule", "weight_decay", "grad_clip", "seq_len", "seed", "dtype", "skip_bad_lines")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quantize_base")  # in run.json of LoRA runs
LORA_FLAGS = ("lora_alpha", "lora_dropout", "lora_targets", "export_merged", "quantize_base")  # need --lora-r
# train.py --help's sections, in this order
GROUPS = MODEL, DATA, OPTIMISATION, LORA, CHECKPOINTS, HARDWARE = (
    "model", "data", "optimisation", "LoRA and QLoRA (guide: docs/training.md)", "evaluation and checkpoints",
    "hardware")


def dashed(name: str) -> str:
    """A field's flag: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def flag(default=MISSING, help: str | None = None, *, group: str, type=None, at_least: int | float | None = None,
         above: float | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None, add=None):
    """A TrainConfig field with its train.py flag, written once. The flag is --name-with-dashes, required without a
    default; a boolean is a switch (--name, or --no-name when it defaults to True). help: argparse's (%(default)s
    shows the default); group: its --help section (GROUPS). The check, on the command line and in TrainConfig alike:
    at_least, an integer's lower bound (the flag's type then positive_int for 1, non_negative_int for 0, else int)
    or a float's (a finite number); above, a float's strict bound; choices. type: argparse's, where no bound gives
    it. add: a flag shared with the other scripts (cli.add_threads_flag) that adds itself, help and all."""
    if type is None and (at_least is not None or above is not None):
        low = at_least if at_least is not None else above
        type = {0: non_negative_int, 1: positive_int}.get(low, int) if isinstance(low, int) else float
    metadata = dict(help=help, group=group, type=type, at_least=at_least, above=above, choices=choices,
                    metavar=metavar, add=add)
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


def _value_problem(f: Field, value) -> str | None:
    """What is wrong with one field's value by its own check (flag), or None. None is "not given" for an integer
    field and for one whose default is None."""
    m = f.metadata
    if m["choices"] and value not in (None, *m["choices"]):
        return f"{dashed(f.name)} {value!r}: choose one of {', '.join(m['choices'])}"
    low, strict = (m["above"], True) if m["above"] is not None else (m["at_least"], False)
    if isinstance(low, int):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            return f"{dashed(f.name)} must be an integer >= {low}, got {value!r}"
    elif low is not None and not (value is None and f.default is None):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or strict and value == low:
            return f"{dashed(f.name)} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}"
    return None


def pythia_size(config: Config) -> str:
    """The PYTHIA_LR entry nearest to config by parameter count (on a log scale)."""
    n = config.num_parameters
    return min(PYTHIA_LR, key=lambda name: abs(math.log(Config.from_name(name).num_parameters / n)))


def _file_problem(name: str, value: str) -> str | None:
    path = Path(value)
    if not path.exists():
        return f"{name} {value}: no such file"
    if path.is_dir():
        return f"{name} {value}: a directory, not a file"
    if not os.access(path, os.R_OK):
        return f"{name} {value}: not readable (permission denied)"
    return None


def _init_problem(init: str) -> str | None:
    """A checkpoint directory without config.json, a file, a path that does not exist or a string that is no model
    name; a model name passes (it is looked up or fetched when the model loads)."""
    path = Path(init)
    if path.is_dir():
        return None if (path / "config.json").is_file() else (
            f"--init {init}: no config.json there; a checkpoint is a directory holding config.json and the weights")
    if path.exists():
        return f"--init {init}: a file; a checkpoint is a directory holding config.json and the weights"
    if init.startswith("."):  # parse_name would read "./x" as organisation ".", model "x"
        return f"--init {init}: no such directory"
    try:
        parse_name(init)
    except ValueError as e:
        return f"--init {e}"
    return None


def quantized_init(init: str, path: Path) -> str | None:
    """Why checkpoint directory `path` (--init) cannot be trained: its weights are quantized, frozen integers."""
    settings = quantization_settings(path)
    return None if settings is None else f"--init {init}: a quantized checkpoint ({settings}); {LORA_POINTER}"


def _out_problem(out: str) -> str | None:
    """An --out that is a file, lies under a file, or cannot be created or written."""
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing.is_dir():
        return None if os.access(existing, os.W_OK | os.X_OK) else f"--out {out}: {existing} is not writable"
    return f"--out {out}: {'a file' if existing == path else f'{existing} is a file'}, not a directory"


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings; each field is also a train.py flag (flag: its help, section and check; parser). None: not
    given, a default that adapts to what was (resolve, batches, warmup, run_length, lora)."""
    data: str = flag(help=f"{DOLLY_15K!r} (databricks-dolly-15k, downloaded once to ~/.cache/gptneox or "
                     "$GPTNEOX_CACHE), a .jsonl file of {instruction, context, response} records (Dolly's template, "
                     "loss on the response), or pretraining text/tokens: .txt, or uint16 .bin/.npy", group=DATA)
    out: str = flag(help="output directory: model (HF layout), metrics.jsonl, loss.png, run.json, checkpoints/",
                    group=CHECKPOINTS)
    # ----------------------------------------------------------------------------------------------------- model
    init: str | None = flag(None, "checkpoint to fine-tune: a directory in the HF layout, or a name resolved like "
                            "sample.py --ckpt (e.g. EleutherAI/pythia-2.8b)", group=MODEL)
    config: str | None = flag(None, "instead of --init: a preset name (pythia-70m, ...) or a config.json, randomly "
                              "initialised (gpt-neox small_init / wang_init) for pretraining", group=MODEL)
    tokenizer: str | None = flag(None, "tokenizer.json (default: the one in the --init directory); needed for "
                                 "instruction data and .txt files. Dolly's 3 special tokens are added if absent",
                                 group=MODEL)
    # ------------------------------------------------------------------------------------------------------ data
    val_size: int | None = flag(None, "examples held out for validation; 0 = none (default: 200 as Dolly, at most a "
                                "tenth of the data)", group=DATA, at_least=0)  # data.default_val_size
    seq_len: int | None = flag(None, "longest record kept (Dolly drops longer ones whole) or packed sequence length, "
                               "at least 2 (default: the model's context, 2048)", group=DATA, at_least=2)
    skip_bad_lines: bool = flag(False, "count and skip malformed data lines instead of stopping at the first",
                                group=DATA)
    # ---------------------------------------------------------------------------------------------- optimisation
    epochs: int | None = flag(None, f"passes over the training data (default {DOLLY_EPOCHS}, as Dolly); not with "
                              "--max-steps", group=OPTIMISATION, at_least=1)
    max_steps: int | None = flag(None, "optimizer steps: the run's length, instead of --epochs", group=OPTIMISATION,
                                 at_least=1)
    batch_size: int | None = flag(None, f"global batch in examples, summed over processes and accumulation (default: "
                                  f"{DOLLY_BATCH}, Dolly's {DOLLY_MICRO_BATCH} per GPU x 8 A100s, rounded to a "
                                  "multiple of --micro-batch-size x processes)", group=OPTIMISATION, at_least=1)
    micro_batch_size: int | None = flag(None, "examples per forward pass per process; batch-size / (micro x "
                                        "processes) micro-batches are accumulated per step (default: the largest "
                                        f"divisor of the per-process batch up to Dolly's {DOLLY_MICRO_BATCH})",
                                        group=OPTIMISATION, at_least=1)
    lr: float | None = flag(None, "peak learning rate. Default: fine-tuning (--init) 5e-6, as Dolly; 2e-4 with "
                            "--lora-r, QLoRA's for models up to 13B; pretraining (--config) Pythia's for the model's "
                            "size (70m 1e-3, 160m 6e-4, 410m and 1b 3e-4, 1.4b 2e-4, 2.8b 1.6e-4, 6.9b and 12b "
                            "1.2e-4; another size takes the nearest's). --resume keeps the run's recorded value",
                            group=OPTIMISATION, above=0.0)  # resolve: DOLLY_LR, LORA_LR, PYTHIA_LR
    warmup_steps: int | None = flag(None, f"warmup steps (default: fine-tuning {DOLLY_WARMUP}, as Dolly; pretraining "
                                    f"{PYTHIA_WARMUP}, Pythia's 1%% of 143000; either way at most a tenth of the run's "
                                    "steps)", group=OPTIMISATION, at_least=0)
    schedule: str | None = flag(None, "constant: DeepSpeed WarmupLR's log warmup then constant (Dolly's: the default "
                                "for fine-tuning); cosine: linear warmup then cosine decay to lr/10 (Pythia's: the "
                                "default for pretraining). --resume keeps the run's recorded value",
                                group=OPTIMISATION, choices=SCHEDULES)
    weight_decay: float = flag(0.0, "AdamW decoupled weight decay on matrices (not biases or LayerNorms); default "
                               "%(default)g, as Dolly", group=OPTIMISATION, at_least=0.0)
    grad_clip: float = flag(1.0, "max global gradient norm (default %(default)s, HF's; 0 = off)", group=OPTIMISATION,
                            at_least=0.0)
    seed: int = flag(42, "seed of the split, the data order and a random init (default %(default)s)",
                     group=OPTIMISATION, type=int)
    # ------------------------------------------------------------------------------------------------------ LoRA
    lora_r: int = flag(0, "rank of LoRA adapters trained on a frozen base (default %(default)s = full fine-tuning; 8 "
                       "or 16 are usual)", group=LORA, type=non_negative_int)  # checked in _lora_problems
    lora_alpha: float | None = flag(None, "LoRA scale alpha / r (default 2 x --lora-r)", group=LORA, type=float)
    lora_dropout: float | None = flag(None, f"dropout on the adapters' input (default {LORA_DROPOUT:g})", group=LORA,
                                      type=float)
    lora_targets: str | None = flag(None, "comma-separated layers to adapt: query, key, value (the rows of the fused "
                                    "query_key_value, any subset), dense, dense_h_to_4h, dense_4h_to_h, embed_out "
                                    f"(default {LORA_TARGETS})", group=LORA)  # lora.TARGETS
    export_merged: bool = flag(False, "with --lora-r: also write the merged model (HF layout, loads in transformers) "
                               "to OUT/merged", group=LORA)
    quantize_base: str | None = flag(None, "with --lora-r, QLoRA: hold the frozen base in int8 or int4 "
                                     "(gptneox.quantize); the adapters stay fp32", group=LORA, choices=QUANTIZE_MODES)
    # -------------------------------------------------------------------------------- evaluation and checkpoints
    eval_every: int = flag(50, "validation loss every N steps and at the end (default %(default)s, as Dolly; 0 = "
                           "never)", group=CHECKPOINTS, at_least=0)
    sample_every: int | None = flag(None, "greedy answer to a fixed instruction every N steps and at the end, logged "
                                    "on one line (instruction data only: pretraining runs never sample; default: "
                                    "--eval-every; 0 = never)", group=CHECKPOINTS, at_least=0)
    save_every: int = flag(200, "save the full training state every N steps (default %(default)s, as Dolly; 0 = only "
                           "the final state); the end is always saved", group=CHECKPOINTS, at_least=0)
    keep: int = flag(3, "training states kept, the newest (default %(default)s; 0 = all)", group=CHECKPOINTS,
                     at_least=0)
    resume: bool = flag(False, "continue the run in --out from its last saved state; give the same other arguments "
                        "(an --out with no saved state is an error). Ctrl-C prints the command", group=CHECKPOINTS)
    # -------------------------------------------------------------------------------------------------- hardware
    device: str | None = flag(None, "auto, cpu, cuda, cuda:1 (default auto: cuda:LOCAL_RANK if available, else cpu; "
                              "a device this machine lacks is refused)", group=HARDWARE, type=device_arg)
    dtype: str | None = flag(None, "bf16 (or bfloat16): autocast with fp32 master weights (default on CUDA, as "
                             "Dolly); fp32 (or float32): default elsewhere", group=HARDWARE,
                             type=dtype_arg(TRAIN_DTYPES, quantize_flag="--lora-r R --quantize-base"))
    threads: int | None = flag(None, group=HARDWARE, at_least=1, add=add_threads_flag)  # the scripts' shared flag
    compile: bool = flag(False, "torch.compile each transformer block", group=HARDWARE)
    grad_checkpointing: bool = flag(False, "recompute activations in backward to save memory (Dolly: on)",
                                    group=HARDWARE)
    progress: bool = flag(True, "no progress bars", group=HARDWARE)  # --no-progress

    def __post_init__(self):
        for problem in self._problems():
            raise UsageError(problem)

    def _problems(self):
        if (self.init is None) == (self.config is None):
            yield "give exactly one of --init (a checkpoint to fine-tune) or --config (a preset, random init)"
        if self.epochs is not None and self.max_steps is not None:
            yield "give --epochs or --max-steps, not both: each sets the run's length"
        for f in fields(self):
            if problem := _value_problem(f, getattr(self, f.name)):
                yield problem
        if self.dtype not in (None, *TRAIN_DTYPES):
            yield (f"--dtype {self.dtype}: training runs in bf16 (autocast over fp32 master weights) or fp32; fp16 "
                   "would need loss scaling")
        if not isinstance(self.seed, int):
            yield f"--seed must be an integer, got {self.seed!r}"
        yield from self._name_problems()
        yield from self._lora_problems()

    def _name_problems(self):
        """What --data, --config and --sample-every say, before any file is looked at."""
        if self.data != DOLLY_15K and Path(self.data).suffix not in DATA_FILES:
            yield (f"--data {self.data}: train.py reads {DOLLY_15K!r}, instruction records (.jsonl, .json) or "
                   "pretraining text or tokens (.txt, or uint16 ids in .bin / .npy)")
        if self.config and not self.config.endswith(".json") and HUB_IDS.get(self.config, self.config) not in PRESETS:
            yield f"--config {self.config}: neither a config.json nor a preset; presets: {', '.join(PRESETS)}"
        if self.sample_every and not is_instruction_data(self.data):
            yield (f"--sample-every answers an instruction, so it needs instruction data (dolly-15k, .jsonl, .json); "
                   f"--data {self.data} is pretraining data")

    def _lora_problems(self):
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            yield f"--lora-r must be an integer >= 0 (0 = full fine-tuning), got {self.lora_r!r}"
            return
        given = [dashed(k) for k in LORA_FLAGS if getattr(self, k) not in (None, False)]
        if not self.lora_r and given:
            yield f"{', '.join(given)} need(s) LoRA: add --lora-r R (R > 0; 0, the default, is full fine-tuning)"
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
        """Warmup steps: the ones given, else Dolly's 50 (Pythia's 1430 when pretraining) but never more than a tenth
        of the run, so that a short run (--max-steps 20, or a small dataset) still reaches its --lr (Dolly's own run is
        ~620 steps: 50 is 8%; Pythia's 143000: 1430 is 1%)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(PYTHIA_WARMUP if self.config else DOLLY_WARMUP, total_steps // 10)

    @property
    def every_sample(self) -> int:
        """Steps between samples: --sample-every, else --eval-every for instruction data; never for pretraining."""
        if not is_instruction_data(self.data):
            return 0
        return self.eval_every if self.sample_every is None else self.sample_every

    def model_config(self) -> Config:
        """--config's model: a preset, or read from a config.json (pretraining from scratch)."""
        return Config.from_hf_config(self.config) if self.config.endswith(".json") else Config.from_name(self.config)

    def size_warnings(self, n_train: int, batch: int, total_steps: int) -> list[str]:
        """A line for each way the data is small for the run's settings (said before training starts): a batch
        larger than the data, an epoch shorter than the warmup."""
        warnings, per_epoch, warmup = [], steps_per_epoch(n_train, batch), self.warmup(total_steps)
        if batch > n_train:
            which = f"the default batch (Dolly's) of {batch}" if self.batch_size is None else f"--batch-size {batch}"
            warnings.append(f"{which} is larger than the {n_train} training examples: every step sees each of them "
                            f"{batch / n_train:.1f} times on average, at {batch / n_train:.1f}x the compute of "
                            f"--batch-size {n_train}")
        if per_epoch < warmup:
            warnings.append(f"an epoch is {per_epoch} step{'s' if per_epoch > 1 else ''}, shorter than the {warmup} "
                            f"warmup steps: the learning rate reaches its peak {self.lr:g} only after "
                            f"{warmup / per_epoch:.1f} epochs")
        return warnings

    # ------------------------------------------------------------------------------------- paths and defaults
    def check_paths(self) -> None:
        """Raise UsageError for the first path that cannot work, without loading anything: a --data, --tokenizer or
        --config file missing or unreadable, an --init directory that does not exist (and is no model name; a name
        is resolved when the model loads), an --out that is or lies under a file, data that needs a tokenizer
        where there is none. A quantized --init, which cannot be trained, is a ValueError."""
        problems = [_file_problem("--data", self.data) if self.data != DOLLY_15K else None,
                    _file_problem("--config", self.config) if self.config and self.config.endswith(".json") else None,
                    self.tokenizer and self._tokenizer_problem(), self.init and _init_problem(self.init),
                    _out_problem(self.out)]
        for problem in filter(None, problems):
            raise UsageError(problem)
        if self.init and Path(self.init).is_dir() and (problem := quantized_init(self.init, Path(self.init))):
            raise ValueError(problem)  # the file's content, not how it was named: a runtime error (exit 1)
        if problem := self._missing_tokenizer():
            raise UsageError(problem)

    def _tokenizer_problem(self) -> str | None:
        path = Path(self.tokenizer)
        if path.is_dir():
            return None if (path / "tokenizer.json").is_file() else f"--tokenizer {path}: no tokenizer.json there"
        return _file_problem("--tokenizer", self.tokenizer)

    def _missing_tokenizer(self) -> str | None:
        if not needs_tokenizer(self.data) or self.tokenizer:
            return None
        what = "instruction data" if is_instruction_data(self.data) else "a text file"
        if self.config:
            return f"--data {self.data}: {what} needs a tokenizer; add --tokenizer (a --config model has none)"
        if Path(self.init).is_dir() and not (Path(self.init) / "tokenizer.json").is_file():
            return f"--data {self.data}: {what} needs a tokenizer, and --init {self.init} has no tokenizer.json; " \
                   "add --tokenizer"
        return None

    def resolve(self, recorded: dict | None = None) -> tuple["TrainConfig", list[str]]:
        """This config with --lr and --schedule resolved, and a line for each default that needs saying.

        recorded: run.json of the run being resumed; its lr and schedule are kept where none was given, so that a
        run resumes with the values it started with even if the defaults changed since. Otherwise fine-tuning takes
        Dolly's (LORA_LR with LoRA), pretraining Pythia's for the nearest size (PYTHIA_LR, PYTHIA_SCHEDULE)."""
        recorded, values, notes = recorded or {}, {}, []
        lr, schedule, why = self._default_lr_schedule()
        for name, default in (("lr", lr), ("schedule", schedule)):
            given, kept = getattr(self, name), recorded.get(name)
            values[name] = given if given is not None else kept if kept is not None else default
            if given is None and kept is not None and kept != default:
                shown = (f"{kept:g}", f"{default:g}") if name == "lr" else (kept, default)
                notes.append(f"--resume: {name} {shown[0]} as run.json recorded it (the default is now {shown[1]})")
        if why and any(getattr(self, k) is None and recorded.get(k) is None for k in values):
            notes.append(why)
        return replace(self, **values), notes

    def _default_lr_schedule(self) -> tuple[float, str, str | None]:
        """(lr, schedule) by default for this kind of run, and for pretraining a line that says whose they are."""
        if not self.config:
            return (LORA_LR if self.lora_r else DOLLY_LR), DOLLY_SCHEDULE, None
        config = self.model_config()
        size, n = pythia_size(config), config.num_parameters
        why = (f"pretraining defaults: Pythia's for {size}, the nearest size to this model's "
               f"{f'{n / 1e9:.3g}B' if n >= 1e9 else f'{n / 1e6:.3g}M'} parameters (lr {PYTHIA_LR[size]:g}, "
               f"{PYTHIA_WARMUP} warmup steps but at most a tenth of the run, cosine decay to lr / 10)")
        return (LORA_LR if self.lora_r else PYTHIA_LR[size]), PYTHIA_SCHEDULE, why

    def run_settings(self, *, dtype: str, batch_size: int) -> dict:
        """The settings that define the run (RUN_KEYS), as resolved: what run.json holds and a resume must repeat."""
        epochs, max_steps = self.run_length
        settings = {**asdict(self), "epochs": epochs, "max_steps": max_steps, "dtype": dtype, "batch_size": batch_size}
        lora = self.lora
        if lora:  # resolved; a full fine-tuning run's run.json has none of these keys (as before LoRA existed)
            settings.update(lora_alpha=lora.alpha, lora_dropout=lora.dropout, lora_targets=",".join(lora.targets))
        return {k: settings[k] for k in RUN_KEYS + (LORA_KEYS if lora else ())}


def parser(description: str = "", prog: str = "train.py") -> ArgumentParser:
    """train.py's command line, generated from TrainConfig's fields (flag): in GROUPS' sections, each in field order;
    its values are TrainConfig's keyword arguments."""
    p = ArgumentParser(description, prog=prog)
    for title in GROUPS:
        group = p.add_argument_group(title)
        for f in fields(TrainConfig):
            m = f.metadata
            if m["group"] != title:
                continue
            if m["add"]:
                m["add"](group)
            elif f.default is MISSING:
                group.add_argument(dashed(f.name), required=True, help=m["help"], type=m["type"], metavar=m["metavar"])
            elif isinstance(f.default, bool):  # a switch; one that defaults to on is turned off by --no-NAME
                name = dashed(f.name) if not f.default else "--no-" + dashed(f.name)[2:]
                group.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true",
                                   help=m["help"])
            else:
                group.add_argument(dashed(f.name), default=f.default, type=m["type"], choices=m["choices"],
                                   metavar=m["metavar"], help=m["help"])
    return p
