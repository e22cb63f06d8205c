"""Fine-tune a GPT-NeoX model the Dolly way (instruction records, loss on the response only) or pretrain one on raw
text, from one CPU to many GPUs (torchrun + FSDP full sharding). A guide: docs/training.md.

    python train.py --init EleutherAI/pythia-2.8b --data dolly-15k --out out/dolly-v2-3b      # Dolly v2's recipe
    torchrun --nproc_per_node 8 train.py --init EleutherAI/pythia-12b --data dolly-15k --out out/dolly-v2-12b
    python train.py --config pythia-70m --tokenizer tokenizer.json --data tokens.bin --out out/p70m \\
        --max-steps 2000 --schedule cosine --lr 6e-4 --warmup-steps 100 --seq-len 2048
    ... the same command --resume                                  # continue a killed run, bit for bit

OUT receives the model in the Hugging Face layout (config.json, model.safetensors, tokenizer.json), metrics.jsonl
(one JSON object per step), loss.png, run.json (the settings that define the run) and checkpoints/step-*.pt (the
full training state). Shapes: B micro-batch, T padded length, V vocab.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from gptneox import distributed as dist
from gptneox.config import Config
from gptneox.data import (DOLLY_15K, IGNORE_INDEX, TOKEN_FILES, DataError, PackedTokens, add_dolly_tokens,
                          batch_indices, collate, count_targets, default_val_size, fetch_dolly15k, load_tokens,
                          read_records, split_indices, steps_per_epoch, tokenize_records)
from gptneox.dolly import format_prompt
from gptneox.model import GPTNeoX
from gptneox.schedule import SCHEDULES, lr_at
from gptneox.tokenizer import Tokenizer
from gptneox.train_state import load_state, rng_state, save_state, set_rng_state, state_files

# the settings that define a run: --resume must repeat them, and an --out holding other values is refused
RUN_KEYS = ("init", "config", "tokenizer", "data", "epochs", "max_steps", "val_size", "batch_size", "lr",
            "warmup_steps", "schedule", "weight_decay", "grad_clip", "seq_len", "seed", "dtype", "skip_bad_lines")
SAMPLE_INSTRUCTION = "Explain to me the difference between nuclear fission and fusion."  # Dolly's README example
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (performance.md)
BETAS, EPS = (0.9, 0.999), 1e-8  # HF TrainingArguments' AdamW defaults, which Dolly's DeepSpeed "auto" takes


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- output dir
def check_out(out: Path, run: dict, resume: bool) -> Path | None:
    """Refuse an --out that holds another run (or a run without --resume); the state file to resume from."""
    run_file = out / "run.json"
    if not run_file.exists():
        if out.exists() and any(out.iterdir()):
            raise RunError(f"--out {out} is not empty and holds no run.json: it is not a train.py run; "
                           "choose an empty or new directory")
        return None
    saved = json.loads(run_file.read_text())
    diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in run.items() if saved.get(k) != v]
    if diff:
        raise RunError(f"--out {out} holds a different run ({'; '.join(diff)}); use another --out")
    states = state_files(out / "checkpoints")
    if states and not resume:
        raise RunError(f"--out {out} already holds this run (last checkpoint {states[-1].name}); "
                       "add --resume to continue it, or choose another --out")
    return states[-1] if resume and states else None


# --------------------------------------------------------------------------------------------- model, tokenizer
def load_model(init, config, tokenizer, seed, meta=False) -> tuple[GPTNeoX, Tokenizer | None]:
    """An fp32 model (the master weights) on the CPU and its tokenizer (None if there is none).

    meta: only the model's shapes, on the meta device (FSDP processes other than 0, which receive their shards
    from process 0 instead of each holding the whole model)."""
    if init:
        path = Path(init)
        if not path.is_dir():
            from gptneox.hub import resolve_checkpoint  # a hub name or a file: resolved like sample.py --ckpt
            path = Path(resolve_checkpoint(init))
        if meta:
            with torch.device("meta"):
                model = GPTNeoX(Config.from_hf_config(path))
        else:
            model = GPTNeoX.from_pretrained(path, dtype=torch.float32)
        tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.json"
    else:
        cfg = Config.from_hf_config(config) if config.endswith(".json") else Config.from_name(config)
        torch.manual_seed(seed)
        with torch.device("meta" if meta else "cpu"):
            model = GPTNeoX(cfg)
        if not meta:
            model.init_weights()
        tok_file = Path(tokenizer) if tokenizer else None
    tok = Tokenizer.from_pretrained(tok_file) if tok_file and tok_file.exists() else None
    if tokenizer and tok is None:
        raise FileNotFoundError(f"--tokenizer {tokenizer}: file not found")
    return model.train(), tok


def resize_vocab(model: GPTNeoX, n: int) -> None:
    """HF's resize_token_embeddings(n), in place: Pythia's padded rows are cut to n (Dolly: 50280); new rows, if
    any, start at the mean of the old ones (HF's mean_resizing)."""
    old = model.config.vocab_size
    if n == old:
        return
    for module in (model.gpt_neox.embed_in, model.embed_out):
        w = module.weight.data  # [old, C]
        w = w[:n] if n < old else torch.cat([w, w.mean(0, keepdim=True).expand(n - old, -1)])
        module.weight = torch.nn.Parameter(w.clone())
    model.gpt_neox.embed_in.num_embeddings = model.embed_out.out_features = n
    model.config = model.config.replace(vocab_size=n)
    if model.config.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight


def enable_grad_checkpointing(model: GPTNeoX) -> None:
    """Recompute each block's activations in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint
    for block in model.gpt_neox.layers:
        block.forward = lambda *a, f=block.forward: checkpoint(f, *a, use_reentrant=False)


# ---------------------------------------------------------------------------------------------------------- data
class Subset:
    def __init__(self, data, indices):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def build_data(data, tok, *, seq_len, val_size, seed, skip_bad_lines, log):
    """(train, val, instruction?) from --data: a Dolly JSON-lines file or "dolly-15k", or .txt/.bin/.npy tokens."""
    path = Path(data)
    if data == DOLLY_15K or path.suffix in (".jsonl", ".json"):
        if tok is None:
            raise RunError("instruction data needs a tokenizer: --tokenizer, or a tokenizer.json in --init")
        if data == DOLLY_15K:
            path = fetch_dolly15k(Path(os.environ.get("GPTNEOX_CACHE", Path.home() / ".cache" / "gptneox")),
                                  progress=log.enabled)
        records, skipped = read_records(path, skip_bad_lines=skip_bad_lines)
        examples, dropped = tokenize_records(records, tok, seq_len)
        log(f"{path}: {len(records)} records, {skipped} bad lines skipped, {dropped} dropped as longer than "
            f"--seq-len {seq_len} - 1 tokens, {len(examples)} kept")
        if not examples:
            raise DataError(f"{path}: no record left to train on after filtering ({skipped} bad lines, {dropped} "
                            "over-long)")
    elif path.suffix in (".txt", *TOKEN_FILES):
        examples = PackedTokens(load_tokens(path, tok), seq_len, str(path))
        log(f"{path}: {len(examples.tokens)} tokens, {len(examples)} sequences of {seq_len}")
    else:
        raise DataError(f"--data {data}: expected {DOLLY_15K!r}, a .jsonl/.json file of instruction records, "
                        "or pretraining tokens (.txt, .bin, .npy)")
    val_size = default_val_size(len(examples)) if val_size is None else val_size
    train, val = split_indices(len(examples), val_size, seed)
    return Subset(examples, train), Subset(examples, val)


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
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


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
        flops += input_ids.numel() * flops_per_token(model.config, input_ids.shape[1])
    return total, positions, flops


def flops_per_token(c: Config, T: int) -> float:
    """Training FLOPs per token, 6 N + 6 L C T (PaLM / nanoGPT; N without the embedding lookup)."""
    n = c.num_parameters - c.vocab_size * c.hidden_size
    return 6 * n + 6 * c.num_hidden_layers * c.hidden_size * T


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
    from gptneox.generate import completion_text, generate, stop_ids
    model.eval()
    ids = tok.encode(format_prompt(SAMPLE_INSTRUCTION))
    with autocast:
        out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=0, tokenizer=tok)
    model.train()
    return completion_text(tok, out[0].tolist(), stop_ids(model, tokenizer=tok))


# ---------------------------------------------------------------------------------------------------- saving
def full_state(model, optimizer=None):
    """(model, optimizer) state dicts gathered whole on the CPU of process 0 (other processes get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def restore(model, optimizer, state) -> None:
    """Load a whole saved state; under FSDP each process keeps its own shard of every tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def export(model_state, config, tok, out: Path, dtype) -> None:
    """The model in the HF layout in out (config.json, safetensors, tokenizer.json); each file replaced atomically."""
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.load_state_dict({k: v.to(dtype) for k, v in model_state.items()}, assign=True)
    tmp = out / f".export-{os.getpid()}"
    model.save_pretrained(tmp)
    if tok is not None:
        tok.backend.save(str(tmp / "tokenizer.json"))
    for old in out.glob("model*.safetensors*"):  # a previous export's shards may be named otherwise
        if not (tmp / old.name).exists():
            old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last: until it lands,
        f.replace(out / f.name)  # a crash leaves a config that contradicts the new weights, which loading names
    tmp.rmdir()


def plot_losses(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (train loss per step, validation loss where measured); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
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


def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the rows a killed run logged after its last checkpoint, so they are not there twice."""
    file = out / "metrics.jsonl"
    if file.exists():
        rows = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= step]
        tmp = file.with_name(".metrics.tmp")
        tmp.write_text("".join(line + "\n" for line in rows))
        tmp.replace(file)


class Log:
    """Prints on process 0 only (through tqdm.write while a bar is shown)."""

    def __init__(self, enabled):
        self.enabled, self.bar = enabled, None

    def __call__(self, msg):
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------- main
def setup_run(*, out, device, dtype, init, config, **run):
    """Devices, processes, and the checks before any work: (device, rank, world, autocast, resume file)."""
    device = dist.local_device(device)
    rank, world = dist.setup(device)
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in ("bf16", "fp32"):
        raise RunError(f"--dtype {dtype}: choose bf16 (autocast, fp32 master weights) or fp32")
    if (init is None) == (config is None):
        raise RunError("give exactly one of --init (a checkpoint to fine-tune) or --config (a preset, random init)")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    resume_file = check_out(Path(out), {k: v for k, v in {**run, "init": init, "config": config,
                                                           "dtype": dtype}.items() if k in RUN_KEYS}, run["resume"])
    return device, rank, world, dtype, autocast, resume_file


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over the (possibly sharded) fp32 weights; weight decay on matrices only, not biases or LayerNorms
    (HF Trainer's rule); fused on CUDA."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=BETAS, eps=EPS, fused=device.type == "cuda")


def start(model, optimizer, state, resume_file, out, rank, seed, log):
    """Resume from state (model, optimizer, RNG; metrics cut back to its step), or start afresh."""
    if state:
        restore(model, optimizer, state)
        set_rng_state(state["rng"])  # process 0's stream; others' only drive dropout (none in Pythia / Dolly)
        log(f"resumed from {resume_file} at step {state['step']}")
        if rank == 0:
            truncate_metrics(out, state["step"])
    else:
        torch.manual_seed(seed)
        if rank == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)


def main(*, init=None, config=None, tokenizer=None, data, out, epochs=2, max_steps=None, val_size=None,
         batch_size=48, micro_batch_size=6, lr=5e-6, warmup_steps=50, schedule="constant", weight_decay=0.0,
         grad_clip=1.0, seq_len=None, seed=42, save_every=200, keep=3, eval_every=50, sample_every=None,
         resume=False, device=None, dtype=None, compile=False, grad_checkpointing=False, skip_bad_lines=False,
         progress=True):
    run = dict(tokenizer=tokenizer, data=data, epochs=epochs, max_steps=max_steps, val_size=val_size,
               batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
               grad_clip=grad_clip, seq_len=seq_len, seed=seed, skip_bad_lines=skip_bad_lines, resume=resume)
    device, rank, world, dtype, autocast, resume_file = setup_run(out=out, device=device, dtype=dtype, init=init,
                                                                  config=config, **run)
    out, log = Path(out), Log(rank == 0)
    if batch_size % (micro_batch_size * world):
        raise RunError(f"--batch-size {batch_size} must be a multiple of --micro-batch-size {micro_batch_size} x "
                       f"{world} processes")
    model, tok = load_model(init, config, tokenizer, seed, meta=world > 1 and rank > 0)
    seq_len = seq_len or model.config.max_position_embeddings
    instruction = data == DOLLY_15K or Path(data).suffix in (".jsonl", ".json")
    if instruction and tok is not None:
        tok = add_dolly_tokens(tok)
    train, val = build_data(data, tok, seq_len=seq_len, val_size=val_size, seed=seed,
                            skip_bad_lines=skip_bad_lines, log=log)
    if instruction:
        resize_vocab(model, len(tok))  # rows for the Dolly tokens: 50280, as Dolly
    total_steps = max_steps or epochs * steps_per_epoch(len(train), batch_size)
    log(f"{len(train)} training / {len(val)} validation examples, {total_steps} steps of {batch_size}, "
        f"{world} process(es) on {device}, {dtype}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in {**run, "init": init, "config": config, "dtype": dtype}.items() if k in RUN_KEYS}
        (out / "run.json.tmp").write_text(json.dumps(settings, indent=2) + "\n")
        (out / "run.json.tmp").replace(out / "run.json")
    state = load_state(resume_file) if resume_file else None  # mmap: processes share the pages
    step = state["step"] if state else 0
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if world > 1:
        dist.shard(model, device)  # process 0's weights, scattered: no process holds the whole model on device
    else:
        model.to(device)
    if compile:
        for block in model.gpt_neox.layers:
            block.compile()
    optimizer = make_optimizer(model, lr, weight_decay, device)
    start(model, optimizer, state, resume_file, out, rank, seed, log)
    pad_id = tok.eos_id if tok is not None else 0  # Dolly pads with eos; padding carries no loss and is never seen
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    sample_every = sample_every if sample_every is not None else eval_every
    loop = dict(model=model, optimizer=optimizer, train=train, val=val, tok=tok, out=out, log=log, rank=rank,
                world=world, device=device, autocast=autocast, pad_id=pad_id, peak=peak, step=step,
                total_steps=total_steps, batch_size=batch_size, micro=micro_batch_size, lr=lr,
                warmup_steps=warmup_steps, schedule=schedule, grad_clip=grad_clip, seed=seed, save_every=save_every,
                keep=keep, eval_every=eval_every, sample_every=sample_every, progress=progress)
    try:
        train_loop(**loop)
        model_state, _ = full_state(model)
        if rank == 0:
            export(model_state, model.config, tok, out, torch.bfloat16 if dtype == "bf16" else torch.float32)
            png = plot_losses(out)
            log(f"saved the model to {out}" + (f", loss curve {png}" if png else " (pip install matplotlib for "
                                                                             "loss.png)"))
        dist.barrier()
    finally:
        dist.teardown()


def train_loop(*, model, optimizer, train, val, tok, out, log, rank, world, device, autocast, pad_id, peak, step,
               total_steps, batch_size, micro, lr, warmup_steps, schedule, grad_clip, seed, save_every, keep,
               eval_every, sample_every, progress):
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = log.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    while step < total_steps:
        t0 = time.perf_counter()
        lr_now = lr_at(step, lr=lr, warmup_steps=warmup_steps, max_steps=total_steps, schedule=schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        examples = [train[i] for i in batch_indices(len(train), batch_size, seed, step)]
        n_targets = count_targets(examples)
        if n_targets == 0:
            raise RunError(f"step {step + 1}: the batch has no token to learn from (every label is masked)")
        local, positions, flops = train_step(model, my_micro_batches(examples, rank, world, micro), n_targets,
                                             world, pad_id, device, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        total, positions = dist.all_sum([local, positions], device)
        loss = total / n_targets
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = state_files(out / "checkpoints")
            raise RunError(f"step {step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; stopping "
                           f"without updating. Last good checkpoint: {last[-1] if last else 'none saved yet'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        row = dict(step=step, loss=loss, lr=lr_now, grad_norm=grad_norm, tokens_per_s=positions / dt)
        if peak:
            row["mfu"] = flops / dt / peak
        if val and eval_every and (step % eval_every == 0 or step == total_steps):
            row["val_loss"] = evaluate(model, val, micro, rank, world, pad_id, device, autocast)
            mfu = f", MFU {row['mfu']:.1%}" if peak else ""
            log(f"step {step}: loss {loss:.4f}, val_loss {row['val_loss']:.4f}, lr {lr_now:.2e}, "
                f"{row['tokens_per_s']:.0f} tokens/s{mfu}")
        if tok is not None and tok.is_dolly and sample_every and (step % sample_every == 0 or step == total_steps):
            answer = sample_answer(model, tok, device, autocast)
            log(f"step {step} sample: {SAMPLE_INSTRUCTION!r} -> {answer!r}")
        if rank == 0:
            append_metrics(out, row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % save_every == 0 or step == total_steps:
            save(model, optimizer, out, step, rank, keep, device)
    if bar is not None:
        bar.close()
        log.bar = None


def save(model, optimizer, out, step, rank, keep, device):
    """The full training state, gathered and written by process 0; every process raises if that write fails."""
    model_state, optim_state = full_state(model, optimizer)
    error = None
    if rank == 0:
        try:
            save_state(out / "checkpoints", step, {"step": step, "model": model_state, "optimizer": optim_state,
                                                   "rng": rng_state()}, keep=keep)
        except OSError as e:
            error = e
    if dist.all_sum([error is not None], device)[0]:  # doubles as the barrier
        raise error or RunError(f"step {step}: process 0 could not save the training state")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--val-size", type=int, help="examples held out for validation; 0 = none "
                                                "(default: 200 as Dolly, at most a tenth of the data)")
    g.add_argument("--seq-len", type=int, help="longest record kept (Dolly drops longer ones whole) or packed "
                                               "sequence length (default: the model's context, 2048)")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead "
                                                                  "of stopping at the first")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=2, help="passes over the training data (Dolly: 2)")
    g.add_argument("--max-steps", type=int, help="optimizer steps; when given, sets the run's length and "
                                                 "--epochs is ignored")
    g.add_argument("--batch-size", type=int, default=48, help="global batch in examples (Dolly: 6 per GPU x 8 "
                                                              "A100s = 48), summed over processes and accumulation")
    g.add_argument("--micro-batch-size", type=int, default=6, help="examples per forward pass per process; "
                   "batch-size / (micro x processes) micro-batches are accumulated per step")
    g.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (Dolly: 5e-6)")
    g.add_argument("--warmup-steps", type=int, default=50, help="warmup steps (Dolly: 50)")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant", help="constant: DeepSpeed WarmupLR's log "
                   "warmup then constant (Dolly); cosine: linear warmup then cosine decay to lr/10")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay on matrices "
                                                                   "(not biases or LayerNorms); Dolly: 0")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (HF default 1.0; 0 = off)")
    g.add_argument("--seed", type=int, default=42, help="seed of the split, the data order and a random init")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--out", required=True, help="output directory: model (HF layout), metrics.jsonl, loss.png, "
                                                "checkpoints/")
    g.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps and at the end "
                                                              "(0 = never; Dolly: 50)")
    g.add_argument("--sample-every", type=int, help="greedy answer to a fixed instruction every N steps "
                                                    "(instruction data only; default: --eval-every; 0 = never)")
    g.add_argument("--save-every", type=int, default=200, help="save the full training state every N steps and at "
                                                               "the end (Dolly: 200)")
    g.add_argument("--keep", type=int, default=3, help="training states kept (the newest)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state; "
                                                         "give the same other arguments")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu)")
    g.add_argument("--dtype", choices=("bf16", "fp32"), help="bf16: autocast with fp32 master weights (default on "
                                                              "CUDA, as Dolly); fp32 (default on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save "
                                                                     "memory (Dolly: on)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def cli(argv=None) -> int:
    """Run train.py with argv (default: sys.argv); errors of input, files and saves are one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        main(**vars(args))
    except (RunError, ValueError, OSError) as e:  # bad input, a missing file, a failed save: no traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
