"""Generate text with a Pythia or Dolly v2 checkpoint.

    python sample.py --ckpt dolly-v2-12b --prompt "Explain the difference between fission and fusion."
    python sample.py --ckpt pythia-1.4b --prompt "The capital of France is" --temperature 0
    python sample.py --ckpt checkpoints/my-run --prompt_file prompts.txt     # one prompt per line, one batch
    python sample.py --ckpt dolly-v2-3b --interactive

The generated text streams to stdout; load time, tokens/s, bandwidth and peak memory go to stderr. With a Dolly
tokenizer (or --template dolly) each prompt is an instruction wrapped in Dolly's generation prompt, and the answer is
what the model writes before "### End". Guide: docs/sampling.md.
"""

import argparse
import resource
import sys
import time

import torch

from gptneox import Config, GPTNeoX, Tokenizer
from gptneox.dolly import format_prompt
from gptneox.generate import TextStream, check_sampling, completion_text, generate, generate_steps, stop_ids
from gptneox.hub import resolve_checkpoint

# Dolly's InstructionTextGenerationPipeline defaults (databrickslabs/dolly training/generate.py, spec 7.3)
DOLLY_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=0.92, max_new_tokens=256)
PLAIN_DEFAULTS = dict(temperature=0.8, top_k=200, top_p=None, max_new_tokens=200)  # gpt-fast's / nanoGPT's
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------------ setup
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (try --device cpu)")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it (Dolly's own choice), else fp16 on GPU; fp32 on CPU (fast and exact there)."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache (a checkpoint just downloaded), unlike MemFree
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(config: Config, dtype: torch.dtype, device: torch.device, batch: int, max_len: int, name: str):
    """Refuse, with the numbers, a model whose weights and KV cache exceed the device's free memory."""
    size = torch.empty(0, dtype=dtype).element_size()
    weights = config.num_parameters * size
    cache = 2 * config.num_hidden_layers * batch * max_len * config.hidden_size * size
    free = free_bytes(device)
    if free is not None and weights + cache > free:
        raise UsageError(f"{name} needs {weights / 1e9:.1f} GB for its weights in {str(dtype)[6:]} plus "
                         f"{cache / 1e9:.2f} GB of KV cache, but {device} has {free / 1e9:.1f} GB free; try a smaller "
                         "--dtype, fewer prompts or --max_new_tokens, or another --device")


def locate(ckpt: str, tokenizer_path: str | None):
    """The checkpoint directory, its Config and the tokenizer, before any weight is read."""
    try:
        path = resolve_checkpoint(ckpt)
        config = Config.from_hf_config(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    tokenizer_file = tokenizer_path or path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_pretrained(tokenizer_file)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{e}; put tokenizer.json in the checkpoint directory or pass --tokenizer") from None
    return path, config, tokenizer


def load_model(path, config: Config, name: str, device: torch.device, dtype: torch.dtype) -> GPTNeoX:
    try:
        return GPTNeoX.from_pretrained(path, device=device, dtype=dtype, progress=sys.stderr.isatty())
    except torch.OutOfMemoryError:
        raise UsageError(f"{name} does not fit on {device} in {str(dtype)[6:]} "
                         f"({config.num_parameters * dtype.itemsize / 1e9:.1f} GB of weights)") from None


# ------------------------------------------------------------------------------------------------------ prompts
def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--prompt_file {prompt_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"--prompt_file {prompt_file}: no prompts (one per line, blank lines skipped)")
        return prompts
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give --prompt, --prompt_file, pipe text on stdin, or use --interactive")
        prompt = sys.stdin.read().rstrip("\n")  # the newline that echo and editors end a file with
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return [prompt]


def encode(tokenizer, text: str, context: str | None, template: str, window: int, index: int) -> list[int]:
    text = format_prompt(text.strip(), context) if template == "dolly" else text
    ids = tokenizer.encode(text)
    if len(ids) >= window:
        how = " with the Dolly template" if template == "dolly" else ""
        raise UsageError(f"prompt {index + 1} is {len(ids)} tokens{how}"
                         f"; the model's context window is {window} tokens, leaving no room to generate: shorten it")
    return ids


def settings(args: dict, template: str, longest: int, window: int) -> dict:
    """Sampling settings: the flags given, else Dolly's pipeline defaults (Dolly template) or PLAIN_DEFAULTS."""
    defaults = DOLLY_DEFAULTS if template == "dolly" else PLAIN_DEFAULTS
    s = {k: args[k] if args[k] is not None else v for k, v in defaults.items()}
    s["repetition_penalty"] = args["repetition_penalty"]
    try:
        check_sampling(**s)
    except ValueError as e:
        raise UsageError(str(e).replace("max_new_tokens", "--max_new_tokens", 1)) from None
    if longest + s["max_new_tokens"] > window:
        clipped = window - longest
        print(f"note: --max_new_tokens {s['max_new_tokens']} clipped to {clipped}: the longest prompt is {longest} "
              f"tokens and the context window {window}", file=sys.stderr)
        s["max_new_tokens"] = clipped
    return s


# ------------------------------------------------------------------------------------------------------ running
def run_one(model, tokenizer, ids, gen: dict, strip: bool) -> int:
    """Stream one completion to stdout; returns the number of tokens generated. strip: drop leading and trailing
    whitespace as Dolly's pipeline does (trailing whitespace is held back until more text follows it)."""
    text = TextStream(tokenizer, stop_ids(model, gen.get("eos_token_id"), tokenizer), gen.get("stop_strings", ()))
    started, pending, state = not strip, "", None

    def emit(piece):
        nonlocal started, pending
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if strip:
            piece = pending + piece
            pending = piece[len(piece.rstrip()):]
            piece = piece[:len(piece) - len(pending)]
        print(piece, end="", flush=True)

    for state in generate_steps(model, [ids], tokenizer=tokenizer, **gen):
        emit(text.update(state.tokens[0, :state.n].tolist(), final=bool(state.done[0])))
    emit(text.update(state.tokens[0, :state.n].tolist(), final=True))
    print(flush=True)
    return state.n


def run_batch(model, tokenizer, prompts: list[list[int]], gen: dict, strip: bool) -> int:
    """Generate all prompts as one left-padded batch, then print each completion; returns the tokens generated."""
    tokens = generate(model, prompts, tokenizer=tokenizer, **gen)
    ends = stop_ids(model, gen.get("eos_token_id"), tokenizer)
    count = 0
    for i, row in enumerate(tokens.tolist()):
        text = completion_text(tokenizer, row, ends, gen.get("stop_strings", ()))
        print(f"--- sample {i + 1} of {len(prompts)} ---\n{text.strip() if strip else text}", flush=True)
        count += next((j + 1 for j, t in enumerate(row) if t in ends), len(row))
    return count


def interact(model, tokenizer, template, context, gen, window) -> None:
    """A read-answer loop on stdin; each turn is independent (Dolly is an instruction model, not a chat model)."""
    print("Type an instruction and press Enter; Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        try:
            ids = encode(tokenizer, line.strip(), context, template, window, 0)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        run_one(model, tokenizer, ids, {**gen, "max_new_tokens": min(gen["max_new_tokens"], window - len(ids))},
                strip=template == "dolly")


def report(model, device, load_s, gen_s, new_tokens, batch):
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_in" not in n)
    steps = new_tokens / max(batch, 1)
    rate = new_tokens / gen_s if gen_s > 0 else float("nan")
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB on {device}"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB (process RSS)"
    print(f"load {load_s:.1f} s | {new_tokens} tokens in {gen_s:.2f} s: {rate:.1f} tokens/s, "
          f"{weights * steps / gen_s / 1e9 if gen_s > 0 else 0:.1f} GB/s of weights | peak memory {peak}",
          file=sys.stderr)


def main(*, ckpt, prompt=None, prompt_file=None, context=None, max_new_tokens=None, temperature=None, top_k=None,
         top_p=None, repetition_penalty=None, seed=None, num_samples=1, device="auto", dtype="auto",
         template="auto", stop=None, tokenizer=None, compile=False, interactive=False) -> int:
    args = dict(locals())
    # setup
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {num_samples}")
    path, config, tok = locate(ckpt, tokenizer)
    window = config.max_position_embeddings
    template = ("dolly" if tok.is_dolly else "none") if template == "auto" else template
    if context is not None and template != "dolly":
        raise UsageError("--context is Dolly's Input: block; it needs --template dolly (or a Dolly checkpoint)")
    gen = dict(seed=seed, compile=compile, stop_strings=list(stop or []))
    if template == "dolly" and tok.end_key_id is None:  # Dolly's format on a tokenizer without its special tokens
        gen["stop_strings"].append("### End")
    # data
    prompts = [] if interactive else read_prompts(prompt, prompt_file)
    ids = [encode(tok, p, context, template, window, i) for i, p in enumerate(prompts) for _ in range(num_samples)]
    gen.update(settings(args, template, max(map(len, ids), default=1), window))
    # model
    max_len = window if compile or interactive else max(map(len, ids)) + gen["max_new_tokens"]
    check_fits(config, torch_dtype, dev, max(len(ids), 1), max_len, ckpt)
    t0 = time.perf_counter()
    model = load_model(path, config, ckpt, dev, torch_dtype)
    load_s = time.perf_counter() - t0
    if interactive:
        try:
            interact(model, tok, template, context, gen, window)
        except KeyboardInterrupt:
            print(file=sys.stderr)
        return 0
    # generate
    t0 = time.perf_counter()
    if len(ids) == 1:
        n = run_one(model, tok, ids[0], gen, strip=template == "dolly")
    else:
        n = run_batch(model, tok, ids, gen, strip=template == "dolly")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report(model, dev, load_s, time.perf_counter() - t0, n, len(ids))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a model name: dolly-v2-12b, "
                   "databricks/dolly-v2-3b, pythia-1.4b, EleutherAI/pythia-160m-deduped, pythia-410m@step3000 "
                   "(looked up in ./checkpoints, $GPTNEOX_HOME and the Hugging Face cache, else downloaded)")
    p.add_argument("--prompt", help="the prompt (with the Dolly template: the instruction); default: read stdin")
    p.add_argument("--prompt_file", "--prompt-file", help="a file of prompts, one per line, generated as one batch")
    p.add_argument("--context", help="text for Dolly's 'Input:' block (the material the instruction refers to)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, help="tokens to generate at most "
                   "(default: 256 with the Dolly template, else 200); clipped to the context window")
    p.add_argument("--temperature", type=float, help="softmax temperature; 0 = greedy (default: 1.0 Dolly, else 0.8)")
    p.add_argument("--top_k", "--top-k", type=int, help="sample among the k most likely tokens; 0 = off "
                   "(default: 0 Dolly, else 200)")
    p.add_argument("--top_p", "--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off "
                   "(default: 0.92 Dolly, else off)")
    p.add_argument("--repetition_penalty", "--repetition-penalty", type=float,
                   help="divide the logits of tokens already present by this (> 1 discourages repeats; default off)")
    p.add_argument("--seed", type=int, help="random seed for sampling, for reproducible output")
    p.add_argument("--num_samples", "--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations dtype (default: bfloat16 on GPUs that have it, float32 on CPU)")
    p.add_argument("--template", default="auto", choices=["auto", "dolly", "none"],
                   help="dolly: wrap each prompt in Dolly's instruction prompt and print the response; none: raw "
                   "text continuation; auto (default): dolly when the tokenizer has Dolly's special tokens")
    p.add_argument("--stop", action="append", help="stop a completion at this string (repeatable); not printed")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in the checkpoint directory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on GPU); compiles once, on the first token")
    p.add_argument("--interactive", action="store_true", help="a read-answer loop: type a prompt, get the answer")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        sys.exit(main(**vars(args)))
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
