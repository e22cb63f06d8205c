"""train.py's run over a Run object: setup (device, processes, every check), prepare (model, data, optimizer, a
resumed state), train_loop (a step per global batch: accumulate, clip, update; evaluate, sample, save), export_run
(the model in the HF layout, or a LoRA adapter); train() runs them in that order. Shapes: B micro-batch, T padded
length, V vocab.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..cli import UsageError, pick_device, set_threads
from ..config import Config
from ..generation.generator import generate
from ..generation.run import stop_ids
from ..generation.streaming import completion_text
from ..hub import resolve_checkpoint
from ..loading import load
from ..lora.adapter import load_adapter, save_adapter
from ..lora.layers import add_lora, base_state_dict, merge_lora
from ..model import GPTNeoX, causal_lm_loss
from ..prompts.dolly import format_prompt
from ..quant.transform import quantize
from ..tokenizer import Tokenizer
from . import distributed as dist
from . import state as disk
from .config import TrainConfig, quantized_init
from .data import (IGNORE_INDEX, add_dolly_tokens, batch_indices, build_datasets, collate, count_targets,
                   is_instruction_data, steps_per_epoch)
from .schedule import lr_at
from .state import RunError

SAMPLE_INSTRUCTION = "Explain to me the difference between nuclear fission and fusion."  # Dolly's README example
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (docs/performance.md)
BETAS, EPS = (0.9, 0.999), 1e-8  # HF TrainingArguments' AdamW defaults, which Dolly's DeepSpeed "auto" takes
INIT_NAMES = {"ckpt": "--init", "tokenizer": "--tokenizer"}  # loading's arguments as train.py's flags


# ---------------------------------------------------------------------------------------------------- the run
class Log:
    """Prints on process 0 only, above the progress bar (progress.write)."""

    def __init__(self, enabled):
        self.enabled = enabled

    def __call__(self, msg):
        if self.enabled:
            progress.write(msg)

    def warn(self, msg):
        if self.enabled:
            progress.write(f"warning: {msg}", file=sys.stderr)


@dataclass
class Run:
    """What the loop works with, set up in this order by setup (to batch) and prepare (the rest)."""
    cfg: TrainConfig
    out: Path
    log: Log
    device: torch.device
    rank: int
    world: int
    dtype: str
    autocast: object
    batch: int
    micro: int
    model: GPTNeoX = None
    tok: Tokenizer | None = None
    train: object = None
    val: object = None
    optimizer: torch.optim.Optimizer = None
    step: int = 0
    total_steps: int = 0

    @property
    def pad_id(self) -> int:  # Dolly pads with eos; padding carries no loss and is never seen
        return self.tok.eos_id if self.tok is not None else 0


# --------------------------------------------------------------------------------------------- model, tokenizer
def load_model(cfg: TrainConfig, meta: bool = False) -> tuple[GPTNeoX, Tokenizer | None]:
    """An fp32 model (the master weights) on the CPU and its tokenizer (None if there is none).

    meta: only the model's shapes, on the meta device (FSDP processes other than 0, which receive their shards
    from process 0 instead of each holding the whole model)."""
    if cfg.init and not meta:
        return load_init(cfg)
    if cfg.init:
        path = init_path(cfg)
        with torch.device("meta"):
            model = GPTNeoX(Config.from_hf_config(path))
        tok_file = Path(cfg.tokenizer) if cfg.tokenizer else path / "tokenizer.json"
    else:
        torch.manual_seed(cfg.seed)
        with torch.device("meta" if meta else "cpu"):
            model = GPTNeoX(cfg.model_config())
        if not meta:
            model.init_weights()
        tok_file = Path(cfg.tokenizer) if cfg.tokenizer else None
    tok = Tokenizer.from_pretrained(tok_file) if tok_file and tok_file.exists() else None  # --tokenizer: checked
    return model.train(), tok


def init_path(cfg: TrainConfig) -> Path:
    """--init's checkpoint directory (a hub name or a file: resolved like sample.py --ckpt); refused if it holds
    quantized weights, frozen integers (docs/quantization.md), which check_paths sees only in a directory."""
    path = Path(cfg.init)
    if not path.is_dir():
        path = Path(resolve_checkpoint(cfg.init))
    if problem := quantized_init(cfg.init, path):
        raise ValueError(problem)
    return path


def load_init(cfg: TrainConfig) -> tuple[GPTNeoX, Tokenizer | None]:
    """--init in fp32 on the CPU through gptneox.loading.load, and its tokenizer: --tokenizer, else the checkpoint's
    tokenizer.json, else None (token data needs none; check_paths refused the data that does)."""
    path = init_path(cfg)
    tokenizer = cfg.tokenizer or (None if (path / "tokenizer.json").exists() else False)
    model, tok = load(path, dtype=torch.float32, device="cpu", tokenizer=tokenizer, progress=cfg.progress,
                      names=INIT_NAMES)
    return model.train(), tok


def my_micro_batches(run: Run, examples: list) -> list[list]:
    """This process's share of a global batch, cut into micro-batches."""
    per_rank = len(examples) // run.world
    mine = examples[run.rank * per_rank:(run.rank + 1) * per_rank]
    return [mine[i:i + run.micro] for i in range(0, len(mine), run.micro)]


# ---------------------------------------------------------------------------------------------------------- step
def loss_sum(model, input_ids, labels, autocast):
    """Summed next-token cross-entropy over the kept labels (HF's shift), fp32."""
    with autocast:
        logits = model(input_ids)  # [B, T, V]
    return causal_lm_loss(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def train_step(run: Run, micro_batches: list, n_targets: int) -> tuple[float, int, float]:
    """Backward over this process's micro-batches; gradients are of the global batch's mean token loss.

    Each sum is divided by the global target count (and multiplied by world, since FSDP averages over processes),
    so accumulation and sharding give the gradient of one big batch. Returns (local loss sum, positions, flops).
    """
    total, positions, flops = 0.0, 0, 0.0
    for examples in micro_batches:
        input_ids, labels = (t.to(run.device) for t in collate(examples, run.pad_id))
        loss = loss_sum(run.model, input_ids, labels, run.autocast)
        (loss * (run.world / n_targets)).backward()
        total += loss.item()
        positions += input_ids.numel()
        flops += input_ids.numel() * run.model.config.flops_per_token(input_ids.shape[1])
    return total, positions, flops


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over the validation examples; every process runs the same number of forwards (FSDP)."""
    model, val, micro = run.model, run.val, run.micro
    model.eval()
    chunks = [[val[j] for j in range(i, min(i + micro, len(val)))] for i in range(0, len(val), micro)]
    total, count = 0.0, 0
    for k in range(math.ceil(len(chunks) / run.world)):
        i = k * run.world + run.rank
        input_ids, labels = (t.to(run.device) for t in collate(chunks[min(i, len(chunks) - 1)], run.pad_id))
        loss = loss_sum(model, input_ids, labels, run.autocast).item()
        if i < len(chunks):
            total, count = total + loss, count + int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train()
    total, count = dist.all_sum([total, count], run.device)
    return total / max(count, 1)


@torch.no_grad()
def sample_answer(run: Run, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to SAMPLE_INSTRUCTION in Dolly's prompt, up to its stop token."""
    model, tok = run.model, run.tok
    model.eval()
    ids = tok.encode(format_prompt(SAMPLE_INSTRUCTION))
    with run.autocast:
        out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0, tokenizer=tok)
    model.train()
    return completion_text(tok, out[0].tolist(), stop_ids(model, tokenizer=tok))


# --------------------------------------------------------------------------------------------------- output
def export(model_state, config, tok, out: Path, dtype) -> None:
    """The model in the HF layout in OUT (config.json, safetensors, tokenizer.json), through save_pretrained's
    atomic directory swap; the run's own files (run.json, metrics, checkpoints/) carry over. An earlier export is
    replaced only as gptneox wrote it: a hand-edited config.json there is refused, not overwritten."""
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.load_state_dict({k: v.to(dtype) for k, v in model_state.items()}, assign=True)
    model.save_pretrained(out, tokenizer=tok, force=True)


def export_run(run: Run) -> None:
    """Full fine-tuning: the model in OUT. LoRA: the adapter in OUT (PEFT's format) and, with --export-merged, the
    float base reloaded from --init with the adapter folded in, in OUT/merged (a quantized base is never merged)."""
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    state, _ = disk.full_state(run.model, trainable_only=bool(run.cfg.lora))  # gathered whole on process 0
    if run.rank != 0:
        return
    if not run.cfg.lora:
        export(state, run.model.config, run.tok, run.out, dtype)
        return
    save_adapter(run.model, run.out, state=state, tokenizer=run.tok, base_model_name_or_path=run.cfg.init, force=True)
    if run.cfg.export_merged:
        base, _ = load_model(run.cfg)
        load_adapter(base, run.out, resize_embeddings=True)
        merge_lora(base)
        export(base_state_dict(base), base.config, run.tok, run.out / "merged", dtype)


def make_optimizer(run: Run) -> torch.optim.Optimizer:
    """AdamW over the (possibly sharded) fp32 weights; weight decay on matrices only, not biases or LayerNorms
    (HF Trainer's rule); fused on CUDA."""
    trainable = [p for p in run.model.parameters() if p.requires_grad]  # LoRA: the adapters only
    decay = [p for p in trainable if p.ndim >= 2]
    other = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": run.cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=run.cfg.lr, betas=BETAS, eps=EPS, fused=run.device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------- main
def setup(cfg: TrainConfig) -> tuple[Run, Path | None]:
    """Device, threads, paths, processes and every check that needs them, before any weight is read or file written;
    the run's defaults resolved (cfg.resolve: a resumed run keeps the lr and schedule it recorded)."""
    device = dist.local_device(pick_device(cfg.device))  # a device this machine lacks: one line, exit 2
    set_threads(cfg.threads)
    cfg.check_paths()
    cfg, notes = cfg.resolve(disk.read_run(Path(cfg.out)) if cfg.resume else None)
    rank, world = dist.setup(device)
    dtype = cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")
    batch, micro = cfg.batches(world)
    run = Run(cfg, Path(cfg.out), Log(rank == 0), device, rank, world, dtype,
              torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext(), batch, micro)
    resume_file = disk.check_out(run.out, cfg.run_settings(dtype=dtype, batch_size=batch), cfg.resume)
    if cfg.resume and resume_file is None:
        raise UsageError(disk.nothing_to_resume(run.out))
    for note in notes:
        run.log(note)
    return run, resume_file


def attach_lora(run: Run) -> None:
    """LoRA: the frozen base in bf16 for a bf16 run (it needs no fp32 master copy; one process: FSDP wants one dtype
    per shard unit), quantized if asked (QLoRA); fresh fp32 adapters on --lora-targets (seeded init)."""
    cfg = run.cfg
    if run.dtype == "bf16" and run.world == 1:
        run.model.to(torch.bfloat16)
    if cfg.quantize_base:
        quantize(run.model, cfg.quantize_base, group_size=128)
    torch.manual_seed(cfg.seed)
    add_lora(run.model, cfg.lora, dtype=torch.float32)
    n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    run.log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g} on {','.join(cfg.lora.targets)}"
            f"{f', base in {cfg.quantize_base}' if cfg.quantize_base else ''}: {n:,} trainable parameters")


def prepare(run: Run, resume_file: Path | None) -> None:
    """Model, tokenizer, data and optimizer, restored from resume_file if given; run.json is written last."""
    cfg = run.cfg
    run.model, tok = load_model(cfg, meta=run.world > 1 and run.rank > 0)
    seq_len = cfg.seq_len or run.model.config.max_position_embeddings
    instruction = is_instruction_data(cfg.data)
    run.tok = add_dolly_tokens(tok) if instruction and tok is not None else tok
    cache = Path(os.environ.get("GPTNEOX_CACHE", Path.home() / ".cache" / "gptneox"))
    run.train, run.val, summary = build_datasets(cfg.data, run.tok, seq_len=seq_len, val_size=cfg.val_size,
                                                 seed=cfg.seed, skip_bad_lines=cfg.skip_bad_lines, cache_dir=cache,
                                                 progress=cfg.progress and run.rank == 0)
    run.log(summary)
    if instruction:
        run.model.resize_token_embeddings(len(run.tok))  # rows for the Dolly tokens: 50280, as Dolly
    epochs, max_steps = cfg.run_length
    run.total_steps = max_steps or epochs * steps_per_epoch(len(run.train), run.batch)
    run.log(f"{len(run.train)} training / {len(run.val)} validation examples, {run.total_steps} steps of {run.batch} "
            f"({run.micro} per forward), lr {cfg.lr:g} {cfg.schedule} after {cfg.warmup(run.total_steps)} warmup, "
            f"{run.world} process(es) on {run.device}, {run.dtype}")
    for warning in cfg.size_warnings(len(run.train), run.batch, run.total_steps):
        run.log.warn(warning)
    if cfg.lora:
        attach_lora(run)
    run.model.gradient_checkpointing = cfg.grad_checkpointing
    if run.world > 1:
        dist.shard(run.model, run.device)  # process 0's weights, scattered: no process holds the whole model
    else:
        run.model.to(run.device)
    if cfg.compile:
        for block in run.model.gpt_neox.layers:
            block.compile()
    run.optimizer = make_optimizer(run)
    if resume_file:
        state = disk.load_state(resume_file)  # mmap: processes share the pages
        disk.restore(run.model, run.optimizer, state, trainable_only=bool(cfg.lora))
        run.step = state["step"]
        run.log(f"resumed from {resume_file} at step {run.step}")
    else:
        torch.manual_seed(cfg.seed)
    if run.rank == 0:  # only now, with everything loaded: a run that failed before this leaves nothing behind
        disk.write_run(run.out, cfg.run_settings(dtype=run.dtype, batch_size=run.batch))
        disk.truncate_metrics(run.out, run.step)


def train(cfg: TrainConfig) -> None:
    """train.py's order of events for a checked config. Ctrl-C says where the run stopped, and how to go on."""
    run, resume_file = setup(cfg)
    try:
        prepare(run, resume_file)
        train_loop(run)
        export_run(run)
        if run.rank == 0:
            png = disk.plot_losses(run.out)
            run.log(f"saved the model to {run.out}" + (f", loss curve {png}" if png else
                                                       " (pip install matplotlib for loss.png)"))
        dist.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(disk.stop_message(run.out, run.step) if run.rank == 0 else "") from None
    finally:
        dist.teardown()


def train_loop(run: Run) -> None:
    """Steps until run.total_steps: each logged to metrics.jsonl, evaluated, sampled and saved as the flags ask."""
    cfg = run.cfg
    bar = progress.bar(total=run.total_steps, initial=run.step, unit="step", enabled=cfg.progress and run.rank == 0)
    peak = next((v for k, v in PEAK_FLOPS.items() if run.device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    with bar:
        while run.step < run.total_steps:
            row = one_step(run, peak)
            if run.val and cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == run.total_steps):
                row["val_loss"] = evaluate(run)
                mfu = f", MFU {row['mfu']:.1%}" if peak else ""
                run.log(f"step {run.step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, lr {row['lr']:.2e}, "
                        f"{row['tokens_per_s']:.0f} tokens/s{mfu}")
            every = cfg.every_sample  # instruction data only
            if every and (run.step % every == 0 or run.step == run.total_steps):
                answer = sample_answer(run)
                run.log(f"step {run.step} sample: {SAMPLE_INSTRUCTION!r} -> {progress.one_line(answer)}")
            if run.rank == 0:
                disk.append_metrics(run.out, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.save_every and run.step % cfg.save_every == 0 or run.step == run.total_steps:
                disk.save(run.model, run.optimizer, run.out, run.step, run.rank, cfg.keep, run.device,
                          trainable_only=bool(cfg.lora))


def one_step(run: Run, peak: float | None) -> dict:
    """One optimizer step over the global batch `run.step`; its metrics row."""
    cfg, t0 = run.cfg, time.perf_counter()
    lr_now = lr_at(run.step, lr=cfg.lr, warmup_steps=cfg.warmup(run.total_steps), max_steps=run.total_steps,
                   schedule=cfg.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_now
    examples = [run.train[i] for i in batch_indices(len(run.train), run.batch, cfg.seed, run.step)]
    n_targets = count_targets(examples)
    if n_targets == 0:
        raise RunError(f"step {run.step + 1}: the batch has no token to learn from (every label is masked)")
    local, positions, flops = train_step(run, my_micro_batches(run, examples), n_targets)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    total, positions = dist.all_sum([local, positions], run.device)
    loss = total / n_targets
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last = disk.state_files(run.out / "checkpoints")
        raise RunError(f"step {run.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopping "
                       f"without updating. Last good checkpoint: {last[-1] if last else 'none saved yet'}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t0
    row = dict(step=run.step, loss=loss, lr=lr_now, grad_norm=grad_norm, tokens_per_s=positions / dt)
    if peak:
        row["mfu"] = flops / dt / peak
    return row
