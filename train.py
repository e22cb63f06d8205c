"""Fine-tune a GPT-NeoX model the Dolly way (instruction records, loss on the response only) or pretrain one on raw
text, from one CPU to many GPUs (torchrun + FSDP full sharding). A guide: docs/training.md.

    python train.py --init EleutherAI/pythia-2.8b --data dolly-15k --out out/dolly-v2-3b      # Dolly v2's recipe
    torchrun --nproc_per_node 8 train.py --init EleutherAI/pythia-12b --data dolly-15k --out out/dolly-v2-12b
    python train.py --config pythia-70m --tokenizer tokenizer.json --data tokens.bin --out out/p70m \\
        --max-steps 2000             # from scratch: Pythia's lr (1e-3 at 70m), warmup and cosine schedule by default
    ... the same command --resume          # continue a stopped run, bit for bit (Ctrl-C prints this command)
    python train.py --init EleutherAI/pythia-2.8b --data dolly-15k --out out/lora --lora-r 8   # LoRA adapters only

OUT receives the model in the Hugging Face layout (config.json, model.safetensors, tokenizer.json), metrics.jsonl
(one JSON object per step), loss.png, run.json (the settings that define the run) and checkpoints/step-*.pt (the
full training state). With --lora-r, OUT receives the adapter instead (adapter_config.json,
adapter_model.safetensors: PEFT's format) and, with --export-merged, the merged model in OUT/merged. Exit status:
0 done, 2 a usage error, 1 a runtime error (bad data, a failed save, a NaN loss), 130 Ctrl-C. Shapes: B micro-batch,
T padded length, V vocab.
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from gptneox.train import distributed as dist
from gptneox import progress
from gptneox.train import state as disk
from gptneox.cli import (ArgumentParser, UsageError, add_threads_flag, device_arg, dtype_arg, non_negative_int,
                         pick_device, positive_int, run as run_cli, set_threads)
from gptneox.config import Config
from gptneox.train.data import (DOLLY_15K, IGNORE_INDEX, add_dolly_tokens, batch_indices, build_datasets, collate,
                                count_targets, is_instruction_data, steps_per_epoch)
from gptneox.prompts.dolly import format_prompt
from gptneox.generation.generator import generate
from gptneox.generation.run import stop_ids
from gptneox.lora.adapter import load_adapter, save_adapter
from gptneox.lora.layers import add_lora, base_state_dict, merge_lora
from gptneox.model import GPTNeoX, causal_lm_loss
from gptneox.train.schedule import SCHEDULES, lr_at
from gptneox.generation.streaming import completion_text
from gptneox.tokenizer import Tokenizer
from gptneox.train.config import QUANTIZE_MODES, TrainConfig, quantized_init
from gptneox.train.state import RunError

SAMPLE_INSTRUCTION = "Explain to me the difference between nuclear fission and fusion."  # Dolly's README example
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (docs/performance.md)
BETAS, EPS = (0.9, 0.999), 1e-8  # HF TrainingArguments' AdamW defaults, which Dolly's DeepSpeed "auto" takes


# --------------------------------------------------------------------------------------------- model, tokenizer
def load_model(cfg: TrainConfig, meta: bool = False) -> tuple[GPTNeoX, Tokenizer | None]:
    """An fp32 model (the master weights) on the CPU and its tokenizer (None if there is none).

    meta: only the model's shapes, on the meta device (FSDP processes other than 0, which receive their shards
    from process 0 instead of each holding the whole model)."""
    if cfg.init:
        path = Path(cfg.init)
        if not path.is_dir():
            from gptneox.hub import resolve_checkpoint  # a hub name or a file: resolved like sample.py --ckpt
            path = Path(resolve_checkpoint(cfg.init))
        if problem := quantized_init(cfg.init, path):  # frozen integers (docs/quantization.md); a hub name's here
            raise ValueError(problem)
        if meta:
            with torch.device("meta"):
                model = GPTNeoX(Config.from_hf_config(path))
        else:
            model = GPTNeoX.from_pretrained(path, dtype=torch.float32, progress=cfg.progress)
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


def my_micro_batches(examples, rank, world, micro):
    """This process's share of a global batch, cut into micro-batches."""
    per_rank = len(examples) // world
    mine = examples[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


# ---------------------------------------------------------------------------------------------------------- step
def loss_sum(model, input_ids, labels, autocast):
    """Summed next-token cross-entropy over the kept labels (HF's shift), fp32."""
    with autocast:
        logits = model(input_ids)  # [B, T, V]
    return causal_lm_loss(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def train_step(model, micro_batches, n_targets, world, pad_id, device, autocast):
    """Backward over this process's micro-batches; gradients are of the global batch's mean token loss.

    Each sum is divided by the global target count (and multiplied by world, since FSDP averages over processes),
    so accumulation and sharding give the gradient of one big batch. Returns (local loss sum, positions, flops).
    """
    total, positions, flops = 0.0, 0, 0.0
    for examples in micro_batches:
        input_ids, labels = (t.to(device) for t in collate(examples, pad_id))
        loss = loss_sum(model, input_ids, labels, autocast)
        (loss * (world / n_targets)).backward()
        total += loss.item()
        positions += input_ids.numel()
        flops += input_ids.numel() * model.config.flops_per_token(input_ids.shape[1])
    return total, positions, flops


@torch.no_grad()
def evaluate(model, val, micro, rank, world, pad_id, device, autocast) -> float:
    """Mean token loss over the validation examples; every process runs the same number of forwards (FSDP)."""
    model.eval()
    chunks = [[val[j] for j in range(i, min(i + micro, len(val)))] for i in range(0, len(val), micro)]
    total, count = 0.0, 0
    for k in range(math.ceil(len(chunks) / world)):
        i = k * world + rank
        input_ids, labels = (t.to(device) for t in collate(chunks[min(i, len(chunks) - 1)], pad_id))
        loss = loss_sum(model, input_ids, labels, autocast).item()
        if i < len(chunks):
            total, count = total + loss, count + int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train()
    total, count = dist.all_sum([total, count], device)
    return total / max(count, 1)


@torch.no_grad()
def sample_answer(model, tok, device, autocast, max_new_tokens=64) -> str:
    model.eval()
    ids = tok.encode(format_prompt(SAMPLE_INSTRUCTION))
    with autocast:
        out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0, tokenizer=tok)
    model.train()
    return completion_text(tok, out[0].tolist(), stop_ids(model, tokenizer=tok))


# --------------------------------------------------------------------------------------------------- output
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


def export(model_state, config, tok, out: Path, dtype) -> None:
    """The model in the HF layout in OUT (config.json, safetensors, tokenizer.json), through save_pretrained's
    atomic directory swap; the run's own files (run.json, metrics, checkpoints/) carry over. An earlier export is
    replaced only as gptneox wrote it: a hand-edited config.json there is refused, not overwritten."""
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.load_state_dict({k: v.to(dtype) for k, v in model_state.items()}, assign=True)
    model.save_pretrained(out, tokenizer=tok, force=True)


def export_run(run) -> None:
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


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over the (possibly sharded) fp32 weights; weight decay on matrices only, not biases or LayerNorms
    (HF Trainer's rule); fused on CUDA."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    decay = [p for p in trainable if p.ndim >= 2]
    other = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=BETAS, eps=EPS, fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------- main
@dataclass
class Run:
    """What the loop works with, set up by main in this order."""
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
        from gptneox.quant.transform import quantize
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
    run.optimizer = make_optimizer(run.model, cfg.lr, cfg.weight_decay, run.device)
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


def main(**flags):
    """train.py's order of events; flags are TrainConfig's fields. Ctrl-C says where the run stopped, and how to
    go on."""
    cfg = TrainConfig(**flags)  # every value checked before any work
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
    cfg = run.cfg
    bar = progress.bar(total=run.total_steps, initial=run.step, unit="step", enabled=cfg.progress and run.rank == 0)
    peak = next((v for k, v in PEAK_FLOPS.items() if run.device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    with bar:
        while run.step < run.total_steps:
            row = one_step(run, peak)
            if run.val and cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == run.total_steps):
                row["val_loss"] = evaluate(run.model, run.val, run.micro, run.rank, run.world, run.pad_id, run.device,
                                           run.autocast)
                mfu = f", MFU {row['mfu']:.1%}" if peak else ""
                run.log(f"step {run.step}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, lr {row['lr']:.2e}, "
                        f"{row['tokens_per_s']:.0f} tokens/s{mfu}")
            every = cfg.every_sample  # instruction data only
            if every and (run.step % every == 0 or run.step == run.total_steps):
                answer = sample_answer(run.model, run.tok, run.device, run.autocast)
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
    local, positions, flops = train_step(run.model, my_micro_batches(examples, run.rank, run.world, run.micro),
                                         n_targets, run.world, run.pad_id, run.device, run.autocast)
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__, prog="train.py")
    g = p.add_argument_group("model")
    g.add_argument("--init", help="checkpoint to fine-tune: a directory in the HF layout, or a name resolved like "
                                  "sample.py --ckpt (e.g. EleutherAI/pythia-2.8b)")
    g.add_argument("--config", help="instead of --init: a preset name (pythia-70m, ...) or a config.json, "
                                    "randomly initialised (gpt-neox small_init / wang_init) for pretraining")
    g.add_argument("--tokenizer", help="tokenizer.json (default: the one in the --init directory); needed for "
                                       "instruction data and .txt files. Dolly's 3 special tokens are added if absent")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"{DOLLY_15K!r} (databricks-dolly-15k, downloaded once to "
                   "~/.cache/gptneox or $GPTNEOX_CACHE), a .jsonl file of {instruction, context, response} records "
                   "(Dolly's template, loss on the response), or pretraining text/tokens: .txt, or uint16 .bin/.npy")
    g.add_argument("--val-size", type=non_negative_int, help="examples held out for validation; 0 = none "
                   "(default: 200 as Dolly, at most a tenth of the data)")
    g.add_argument("--seq-len", type=int, help="longest record kept (Dolly drops longer ones whole) or packed "
                                               "sequence length, at least 2 (default: the model's context, 2048)")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead "
                                                                  "of stopping at the first")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, help="passes over the training data (default 2, as Dolly); "
                                                           "not with --max-steps")
    g.add_argument("--max-steps", type=positive_int, help="optimizer steps: the run's length, instead of --epochs")
    g.add_argument("--batch-size", type=positive_int, help="global batch in examples, summed over processes "
                   "and accumulation (default: 48, Dolly's 6 per GPU x 8 A100s, rounded to a multiple of "
                   "--micro-batch-size x processes)")
    g.add_argument("--micro-batch-size", type=positive_int, help="examples per forward pass per process; "
                   "batch-size / (micro x processes) micro-batches are accumulated per step (default: the largest "
                   "divisor of the per-process batch up to Dolly's 6)")
    g.add_argument("--lr", type=float, help="peak learning rate. Default: fine-tuning (--init) 5e-6, as Dolly; "
                   "2e-4 with --lora-r, QLoRA's for models up to 13B; pretraining (--config) Pythia's for the model's "
                   "size (70m 1e-3, 160m 6e-4, 410m and 1b 3e-4, 1.4b 2e-4, 2.8b 1.6e-4, 6.9b and 12b 1.2e-4; another "
                   "size takes the nearest's). --resume keeps the run's recorded value")
    g.add_argument("--warmup-steps", type=non_negative_int, help="warmup steps (default: fine-tuning 50, as Dolly; "
                   "pretraining 1430, Pythia's 1%% of 143000; either way at most a tenth of the run's steps)")
    g.add_argument("--schedule", choices=SCHEDULES, help="constant: DeepSpeed WarmupLR's log warmup then constant "
                   "(Dolly's: the default for fine-tuning); cosine: linear warmup then cosine decay to lr/10 "
                   "(Pythia's: the default for pretraining). --resume keeps the run's recorded value")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay on matrices "
                                                                   "(not biases or LayerNorms); default 0, as Dolly")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (default 1.0, HF's; "
                                                                "0 = off)")
    g.add_argument("--seed", type=int, default=42, help="seed of the split, the data order and a random init "
                                                        "(default 42)")
    g = p.add_argument_group("LoRA and QLoRA (guide: docs/training.md)")
    g.add_argument("--lora-r", type=non_negative_int, default=0, help="rank of LoRA adapters trained on a frozen "
                   "base (default 0 = full fine-tuning; 8 or 16 are usual)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default 2 x --lora-r)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0.05)")
    g.add_argument("--lora-targets", help="comma-separated layers to adapt: query, key, value (the rows of the fused "
                   "query_key_value, any subset), dense, dense_h_to_4h, dense_4h_to_h, embed_out "
                   "(default query,key,value)")
    g.add_argument("--export-merged", action="store_true", help="with --lora-r: also write the merged model "
                   "(HF layout, loads in transformers) to OUT/merged")
    g.add_argument("--quantize-base", choices=QUANTIZE_MODES, help="with --lora-r, QLoRA: hold the frozen base in "
                   "int8 or int4 (gptneox.quantize); the adapters stay fp32")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--out", required=True, help="output directory: model (HF layout), metrics.jsonl, loss.png, "
                                                "run.json, checkpoints/")
    g.add_argument("--eval-every", type=non_negative_int, default=50, help="validation loss every N steps and "
                   "at the end (default 50, as Dolly; 0 = never)")
    g.add_argument("--sample-every", type=non_negative_int, help="greedy answer to a fixed instruction every N "
                   "steps and at the end, logged on one line (instruction data only: pretraining runs never sample; "
                   "default: --eval-every; 0 = never)")
    g.add_argument("--save-every", type=non_negative_int, default=200, help="save the full training state every "
                   "N steps (default 200, as Dolly; 0 = only the final state); the end is always saved")
    g.add_argument("--keep", type=non_negative_int, default=3, help="training states kept, the newest "
                                                                        "(default 3; 0 = all)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state; "
                   "give the same other arguments (an --out with no saved state is an error). Ctrl-C prints the "
                   "command")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", type=device_arg, help="auto, cpu, cuda, cuda:1 (default auto: cuda:LOCAL_RANK if "
                   "available, else cpu; a device this machine lacks is refused)")
    g.add_argument("--dtype", type=dtype_arg(("bf16", "fp32"), quantize_flag="--lora-r R --quantize-base"),
                   help="bf16 (or bfloat16): autocast with fp32 master weights (default on CUDA, as Dolly); fp32 (or "
                   "float32): default elsewhere")
    add_threads_flag(g)
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save "
                                                                     "memory (Dolly: on)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def cli(argv=None) -> int:
    """Run train.py with argv (default: sys.argv); returns the exit status (see the module docstring)."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
