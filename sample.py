"""Generate text with a Pythia or Dolly v2 checkpoint.

    python sample.py --ckpt dolly-v2-12b --prompt "Explain the difference between fission and fusion."
    python sample.py --ckpt pythia-1.4b --prompt "The capital of France is" --temperature 0
    python sample.py --ckpt checkpoints/my-run --prompt-file prompts.txt     # one prompt per line, one batch
    python sample.py --ckpt dolly-v2-3b --interactive
    python sample.py --ckpt pythia-2.8b --draft pythia-160m --prompt "Once upon a time"   # speculative decoding
    python sample.py --ckpt pythia-2.8b --adapter out/lora --prompt "What is LoRA?"   # a LoRA adapter (ours or PEFT's)
    python sample.py --ckpt dolly-v2-12b --quantize int4 --prompt "Name three primary colors."  # 4-bit weights

The generated text streams to stdout; load time, tokens/s, bandwidth and peak memory go to stderr. With a Dolly
tokenizer (or --template dolly) each prompt is an instruction wrapped in Dolly's generation prompt, and the answer is
what the model writes before "### End". Exit status: 0 done, 2 a usage error, 1 a runtime error (a missing or corrupt
checkpoint, no memory), 130 Ctrl-C. Guide: docs/sampling.md.
"""

import resource
import sys
import time
from dataclasses import replace

import torch

from gptneox import cli
from gptneox.config import Config
from gptneox.generation import GenerationConfig, Generator, stop_ids
from gptneox.generation.streaming import completion_text
from gptneox.loading import LoadPlan, load, model_bytes, plan
from gptneox.prompts.dolly import format_prompt
from gptneox.quant import describe, quantize_activations, settings_of, weight_bytes

# Dolly's InstructionTextGenerationPipeline defaults (docs/architecture.md, "Dolly v2")
DOLLY_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=0.92, max_new_tokens=256)
PLAIN_DEFAULTS = dict(temperature=0.8, top_k=200, top_p=None, max_new_tokens=200)  # gpt-fast's / nanoGPT's
UsageError = cli.UsageError
FLAGS = {"ckpt": "--ckpt", "adapter": "--adapter", "quantize": "--quantize", "group_size": "--group-size",
         "dtype": "--dtype", "device": "--device", "tokenizer": "--tokenizer"}  # how gptneox.load's errors name them


# ------------------------------------------------------------------------------------------------------ setup
def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache (a checkpoint just downloaded), unlike MemFree
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(config: Config, dtype: torch.dtype, device: torch.device, batch: int, max_len: int, name: str,
               draft: Config | None = None, quantization: dict | None = None):
    """Refuse, with the numbers, a model whose weights and KV cache (and its draft's) exceed the device's memory."""
    size = dtype.itemsize
    weights = model_bytes(config, dtype, quantization) + (draft.num_parameters * size if draft else 0)
    cache = sum(2 * c.num_hidden_layers * batch * max_len * c.hidden_size for c in (config, draft) if c) * size
    free = free_bytes(device)
    if free is not None and weights + cache > free:
        raise UsageError(f"{name} needs {weights / 1e9:.1f} GB for its weights in {describe(quantization, dtype)} plus "
                         f"{cache / 1e9:.2f} GB of KV cache, but {device} has {free / 1e9:.1f} GB free; try a "
                         "smaller --dtype, fewer prompts or --max-new-tokens, or another --device")


def locate_draft(draft: str | None, target: LoadPlan, quantize: str | None, group_size: int, compile: bool):
    """--draft's plan, after checking it speaks the target's tokenizer (None without --draft). --quantize applies
    to the draft too; a quantized draft directory loads quantized by itself."""
    if draft is None:
        return None
    if compile:
        raise UsageError("--compile does not work with --draft yet: choose one")
    p = plan(draft, quantize=quantize, group_size=group_size, dtype=target.dtype, device=target.device,
             names={**FLAGS, "ckpt": "--draft"})
    if p.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
        raise UsageError(f"--draft {draft}: its tokenizer ({p.tokenizer.vocab_size} tokens) differs from the target's "
                         f"({target.tokenizer.vocab_size}); a draft must share the target's vocabulary (every Pythia "
                         "size shares one; Dolly adds three tokens, so a Dolly target needs a Dolly draft)")
    return p


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--prompt-file {prompt_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"--prompt-file {prompt_file}: no prompts (one per line, blank lines skipped)")
        return prompts
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give --prompt, --prompt-file, pipe text on stdin, or use --interactive")
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


def generation_config(flags: dict, template: str, longest: int, window: int) -> GenerationConfig:
    """The flags given, else Dolly's pipeline defaults (Dolly template) or PLAIN_DEFAULTS; validated."""
    defaults = DOLLY_DEFAULTS if template == "dolly" else PLAIN_DEFAULTS
    chosen = {k: flags[k] if flags[k] is not None else v for k, v in defaults.items()}
    try:
        config = GenerationConfig(**chosen, repetition_penalty=flags["repetition_penalty"], seed=flags["seed"],
                                  stop_strings=flags["stop"], num_draft_tokens=flags["num_draft_tokens"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if longest + config.max_new_tokens > window:
        clipped = window - longest
        print(f"note: --max-new-tokens {config.max_new_tokens} clipped to {clipped}: the longest prompt is {longest} "
              f"tokens and the context window {window}", file=sys.stderr)
        config = replace(config, max_new_tokens=clipped)
    return config


# ------------------------------------------------------------------------------------------------------ running
def dolly_strip(pieces):
    """Streamed pieces without the answer's leading and trailing whitespace (Dolly's pipeline strips its response);
    trailing whitespace is held back until more text follows it."""
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        piece = pending + piece
        pending = piece[len(piece.rstrip()):]
        if piece[:len(piece) - len(pending)]:
            yield piece[:len(piece) - len(pending)]


def run_one(gen: Generator, tokenizer, ids, config: GenerationConfig, strip: bool) -> None:
    """Stream one completion to stdout; strip: the Dolly template's answer, stripped as Dolly's pipeline does."""
    pieces = gen.stream(tokenizer, ids, config)
    for piece in dolly_strip(pieces) if strip else pieces:
        print(piece, end="", flush=True)
    print(flush=True)


def run_batch(gen: Generator, tokenizer, prompts: list[list[int]], config: GenerationConfig, strip: bool) -> None:
    """Generate all prompts as one left-padded batch, then print each completion."""
    tokens = gen.generate(prompts, config, tokenizer=tokenizer)
    ends = stop_ids(gen.model, config.eos_token_id, tokenizer)
    for i, row in enumerate(tokens.tolist()):
        text = completion_text(tokenizer, row, ends, config.stop_strings)
        print(f"--- sample {i + 1} of {len(prompts)} ---\n{text.strip() if strip else text}", flush=True)


def interact(gen: Generator, tokenizer, template, context, config: GenerationConfig, window) -> None:
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
        turn = replace(config, max_new_tokens=min(config.max_new_tokens, window - len(ids)))
        run_one(gen, tokenizer, ids, turn, strip=template == "dolly")


def warm_up(gen: Generator, tokenizer, prompts: list[list[int]]) -> float:
    """--compile: compile the decode step on the prompts' shapes before the timed run (two greedy tokens), saying so
    first, since it takes a while; returns the seconds it took. The run's tokens/s then count decoding alone."""
    print("compiling the decode step (first call only) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    gen.generate(prompts, GenerationConfig(max_new_tokens=2, temperature=0), tokenizer=tokenizer)
    gen.tokens_generated = 0
    return time.perf_counter() - t0


def report(model, files, device, load_s, gen_s, new_tokens, batch, stats=None, quantized=None, adapter=None,
           compile_s=None):
    weights = weight_bytes(model)  # read once per decode step: everything but the input embedding
    embed = model.gpt_neox.embed_in.weight
    total = weights + embed.numel() * embed.element_size()
    steps = new_tokens / max(batch, 1)
    rate = new_tokens / gen_s if gen_s > 0 else float("nan")
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB on {device}"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB (process RSS)"
    source = files[0].name if len(files) == 1 else f"{len(files)} shards of {files[0].suffix}"
    source += f" + LoRA adapter {adapter}" if adapter else ""
    compiled = f"compile {compile_s:.1f} s (first call only) | " if compile_s is not None else ""
    print(f"load {load_s:.1f} s ({source}) | {compiled}{new_tokens} tokens in {gen_s:.2f} s: {rate:.1f} tokens/s, "
          f"{weights * steps / gen_s / 1e9 if gen_s > 0 else 0:.1f} GB/s of weights | weights "
          f"{describe(quantized, embed.dtype)}: {total / 1e9:.2f} GB | peak memory {peak}"
          + (f" | speculative: {stats}" if stats is not None else ""), file=sys.stderr)


def main(*, ckpt, prompt=None, prompt_file=None, context=None, max_new_tokens=None, temperature=None, top_k=None,
         top_p=None, repetition_penalty=None, seed=None, num_samples=1, device="auto", dtype="auto",
         template="auto", stop=None, tokenizer=None, compile=False, interactive=False, progress=True, draft=None,
         draft_tokens=4, adapter=None, quantize=None, group_size=None, threads=None, activations=None) -> int:
    flags = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []), num_draft_tokens=draft_tokens)
    # setup
    cli.set_threads(threads)
    dev = cli.pick_device(device)
    torch_dtype = cli.pick_dtype(dtype, dev)
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    group_size = cli.quantize_flags(quantize, group_size)
    target = plan(ckpt, adapter=adapter, quantize=quantize, group_size=group_size, dtype=torch_dtype, device=dev,
                  tokenizer=tokenizer, names=FLAGS)
    draft_plan = locate_draft(draft, target, quantize, group_size, compile)
    config, tok, quantized = target.config, target.tokenizer, target.quantization
    if activations and quantized is None:
        raise UsageError("--activations int8 quantizes a quantized model's activations: give --quantize int8 or int4 "
                         "(or a quantized checkpoint)")
    if activations and dev.type != "cpu":
        raise UsageError(f"--activations int8 runs on the CPU only (the device is {dev}); on a GPU decoding stays "
                         "weight-only")
    window = config.max_position_embeddings
    template = ("dolly" if tok.is_dolly else "none") if template == "auto" else template
    if context is not None and template != "dolly":
        raise UsageError("--context is Dolly's Input: block; it needs --template dolly (or a Dolly checkpoint)")
    if template == "dolly" and tok.end_key_id is None:  # Dolly's format on a tokenizer without its special tokens
        flags["stop"].append("### End")
    # data
    prompts = [] if interactive else read_prompts(prompt, prompt_file)
    ids = [encode(tok, p, context, template, window, i) for i, p in enumerate(prompts) for _ in range(num_samples)]
    gen_config = generation_config(flags, template, max(map(len, ids), default=1), window)
    # model
    max_len = window if compile or interactive else max(map(len, ids)) + gen_config.max_new_tokens
    draft_config = draft_plan.config if draft_plan else None
    check_fits(config, torch_dtype, dev, max(len(ids), 1), max_len, ckpt, draft_config, quantized)
    t0 = time.perf_counter()
    model, _ = load(target, progress=progress)
    draft_model = load(draft_plan, progress=progress)[0] if draft_plan else None
    for m in (model, draft_model) if activations else ():
        if m is not None and settings_of(m) is not None:
            quantize_activations(m, activations)
    load_s, gen = time.perf_counter() - t0, Generator(model, compile=compile, draft_model=draft_model)
    compile_s = warm_up(gen, tok, ids or [[tok.eos_id]]) if compile else None
    if interactive:
        try:
            interact(gen, tok, template, context, gen_config, window)
        except KeyboardInterrupt:
            print(file=sys.stderr)
        return 0
    # generate
    t0 = time.perf_counter()
    (run_one if len(ids) == 1 else run_batch)(gen, tok, ids[0] if len(ids) == 1 else ids, gen_config,
                                              strip=template == "dolly")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    gen_s = time.perf_counter() - t0
    report(model, target.files, dev, load_s, gen_s, gen.tokens_generated, len(ids), gen.stats, quantized,
           adapter, compile_s)
    return 0


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(__doc__, prog="sample.py")
    p.add_argument("--ckpt", required=True, help="checkpoint directory, or a model name: dolly-v2-12b, "
                   "databricks/dolly-v2-3b, pythia-1.4b, EleutherAI/pythia-160m-deduped, pythia-410m@step3000 "
                   "(looked up in ./checkpoints, $GPTNEOX_HOME and the Hugging Face cache, else downloaded)")
    p.add_argument("--prompt", help="the prompt (with the Dolly template: the instruction); default: read stdin")
    p.add_argument("--prompt-file", help="a file of prompts, one per line, generated as one batch")
    p.add_argument("--context", help="text for Dolly's 'Input:' block (the material the instruction refers to)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, help="tokens to generate at most "
                   "(default: 256 with the Dolly template, else 200); clipped to the context window")
    p.add_argument("--temperature", type=float, help="softmax temperature; 0 = greedy (default: 1.0 Dolly, else 0.8)")
    p.add_argument("--top-k", type=cli.non_negative_int, help="sample among the k most likely tokens; 0 = off "
                   "(default: 0 Dolly, else 200)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off (default: 0.92 Dolly, "
                   "else off)")
    p.add_argument("--repetition-penalty", type=float,
                   help="divide the logits of tokens already present by this (> 1 discourages repeats; default off)")
    p.add_argument("--seed", type=int, help="random seed for sampling, for reproducible output")
    p.add_argument("--num-samples", type=cli.positive_int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--device", type=cli.device_arg, default="auto",
                   help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=cli.dtype_arg(extra=("auto",), quantize_flag="--quantize"), default="auto",
                   help="weights and activations: bf16, fp16, fp32 (or bfloat16, float16, float32); auto (default): "
                   "bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU")
    p.add_argument("--template", default="auto", choices=["auto", "dolly", "none"],
                   help="dolly: wrap each prompt in Dolly's instruction prompt and print the response; none: raw "
                   "text continuation; auto (default): dolly when the tokenizer has Dolly's special tokens")
    p.add_argument("--stop", action="append", help="stop a completion at this string (repeatable); not printed")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the one in the checkpoint directory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on GPU); compiles once, on the first token")
    p.add_argument("--interactive", action="store_true", help="a read-answer loop: type a prompt, get the answer")
    p.add_argument("--draft", help="speculative decoding: a smaller checkpoint of the same tokenizer (a directory or "
                   "a name, like --ckpt: pythia-160m for pythia-2.8b, dolly-v2-3b for dolly-v2-12b) drafts tokens the "
                   "model checks in one forward; the output is the model's own (token for token when greedy)")
    p.add_argument("--draft-tokens", type=cli.positive_int, default=4,
                   help="with --draft: tokens drafted per forward of the model (default 4)")
    p.add_argument("--adapter", help="a LoRA adapter directory (train.py --lora-r's output, or PEFT's "
                   "adapter_config.json + adapter_model.safetensors) applied to --ckpt as its base; its tokenizer.json "
                   "is used when present")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization while the checkpoint "
                   "loads: int8 (one scale per output channel) or int4 (groups of --group-size); a quantized "
                   "checkpoint directory needs no flag (docs/quantization.md)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="with --quantize int4: input columns per scale and zero (default 128)")
    p.add_argument("--activations", choices=["int8"], help="CPU only, with a quantized model: also round each "
                   "decode step's activations to int8 per block of 32 columns and use integer dot products, as "
                   "llama.cpp's Q8_0 / Q4_0 do; faster where the CPU has AVX-512 VNNI, less exact (the measured cost: "
                   "docs/quantization.md, \"Quantized activations\"). Default: weight-only, activations in full "
                   "precision")
    cli.add_threads_flag(p)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar while the checkpoint loads")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, build_parser()))
