"""Greedy decode tokens/s on CPU: gptneox against llama.cpp (llama-cpp-python), same random model, batch 1.

    python benchmarks/bench_cpu_vs_llamacpp.py                                    # pythia-160m, 1 and 2 threads
    python benchmarks/bench_cpu_vs_llamacpp.py --model pythia-410m --repeats 5
    python benchmarks/bench_cpu_vs_llamacpp.py --model pythia-160m --threads 1 --repeats 1 --new-tokens 8  # smoke

Optional: never run by CI nor imported by the tests. llama.cpp runs in its own virtual environment, set up once
(pip builds llama-cpp-python from source: about 5 minutes on 2 cores):

    python3 -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install llama-cpp-python        # compiles llama.cpp (-march=native); needs cmake
    /tmp/llama-venv/bin/pip install "transformers<5" torch==2.13.0 numpy sentencepiece safetensors
    /tmp/llama-venv/bin/pip uninstall -y torchvision torchaudio   # if they came along
    mkdir -p /tmp/llama-src && cd /tmp/llama-src
    /tmp/llama-venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    /tmp/llama-venv/bin/pip install /tmp/llama-src/llama_cpp_python-*/vendor/llama.cpp/gguf-py

The sdist's vendor/llama.cpp/convert_hf_to_gguf.py is llama.cpp's own HF -> GGUF converter (it reads the config
through transformers 4.x's AutoConfig, hence that venv's transformers<5); --converter finds it there.

What runs: a GPTNeoXForCausalLM of the preset's shape, randomly initialised with --seed (numerics do not change
speed), saved with save_pretrained (safetensors) and the real Pythia tokenizer into --work-dir; converted to GGUF F32
and Q8_0 by the converter, and to Q4_0 from the F32 file by llama-cpp-python's llama_model_quantize. Rows at each
--threads count: ours fp32 vs llama.cpp F32, ours int8 vs Q8_0, ours int4 (group 32, as Q4_0's blocks) vs Q4_0.
Each measurement is a fresh child process (ours: this interpreter; llama.cpp: --llama-python) that loads the model,
warms up, greedily decodes --new-tokens tokens after a --prompt-len token prompt of fixed random ids, and prints one
JSON line. The two sides alternate, --repeats times; medians are reported. decode = (N - 1) / (time of N tokens -
time of the first), the per-token rate that memory bandwidth bounds; e2e = N / the whole time (prefill included).
Ceiling: a decode step reads every weight but the input embedding once, so tokens/s <= bandwidth / bytes per token,
with the bandwidth a torch sum over a 1 GiB fp32 tensor at the same thread count. Note that llama.cpp's Q4_0 keeps
its output matrix in Q6_K, and that its GELU is the tanh approximation (HF's "gelu" is erf): greedy tokens of the two
fp32 sides need not agree for long on a random model, whose logits are close together.
"""

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT.parent / "shared" / "data" / "pythia-tokenizer.json"
CONVERTERS = "/tmp/llama-src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"
ROWS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0",  # ours -> the GGUF type it runs against
        "int8-a8": "q8_0", "int4-a8": "q4_0"}  # "-a8": ours with quantize_activations, as llama.cpp computes
GROUP_SIZE = 32  # our int4 groups as Q4_0's blocks of 32


def prompt_ids(n: int, seed: int) -> list[int]:
    """The prompt, the same on both sides (stdlib only: the llama worker runs in another venv)."""
    return random.Random(seed).choices(range(50000), k=n)


def emit(tokens, stamps, nbytes):
    """The worker's one JSON line: greedy tokens, seconds to the first and to the last token, bytes per token."""
    print(json.dumps({"tokens": tokens, "first_s": stamps[0], "total_s": stamps[-1], "bytes": nbytes}), flush=True)


# ------------------------------------------------------------------------------------------- workers (children)
def worker_ours(a):
    import torch

    import gptneox
    from gptneox.quant.transform import weight_bytes
    torch.set_num_threads(a.threads)
    mode = None if a.row == "fp32" else a.row.removesuffix("-a8")
    model, _ = gptneox.load(a.path, quantize=mode, group_size=GROUP_SIZE, tokenizer=False)
    if a.row.endswith("-a8"):
        from gptneox.quant import quantize_activations
        quantize_activations(model, "int8")
    gen, ids = gptneox.Generator(model), torch.tensor([prompt_ids(a.prompt_len, a.seed)])

    def run(n):
        config = gptneox.GenerationConfig(max_new_tokens=n, temperature=0, eos_token_id=[])
        t0, stamps, state = time.perf_counter(), [], None
        for state in gen.steps(ids, config):  # one state per new token
            stamps.append(time.perf_counter() - t0)
        return state.tokens[0, :state.n].tolist(), stamps

    run(4)  # warm-up: first-call allocations, int packing
    tokens, stamps = run(a.new_tokens)
    emit(tokens, stamps, weight_bytes(model))


def worker_llama(a):
    import gguf
    import llama_cpp
    llm = llama_cpp.Llama(a.path, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.prompt_len + a.new_tokens
                          + 16, n_batch=max(a.prompt_len, 32), seed=0, verbose=False)
    ids = prompt_ids(a.prompt_len, a.seed)

    def run(n):
        llm.reset()  # n_tokens = 0: the next eval overwrites the KV cache from position 0
        t0, stamps, out = time.perf_counter(), [], []
        llm.eval(ids)
        for i in range(n):
            out.append(llm.sample(temp=0.0, repeat_penalty=1.0))  # temp 0: llama.cpp's greedy sampler (argmax)
            stamps.append(time.perf_counter() - t0)
            if i < n - 1:
                llm.eval([out[-1]])
        return out, stamps

    run(4)
    tokens, stamps = run(a.new_tokens)
    nbytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(a.path).tensors if t.name != "token_embd.weight")
    emit(tokens, stamps, nbytes)


def worker_quantize(a):
    """GGUF F32 -> Q4_0 with llama.cpp's own quantizer, through llama-cpp-python."""
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, a.threads
    if llama_cpp.llama_model_quantize(a.path.encode(), a.out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {a.path}")


# ------------------------------------------------------------------------------------------------ the parent
def save_hf(name: str, out: Path, seed: int):
    """The random model in HF's format, with a tokenizer the converter can open; kept for later runs."""
    if (out / "model.safetensors").is_file():
        return
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from gptneox import Config
    torch.manual_seed(seed)
    hf_config = Config.from_name(name).to_hf_config()
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config)).eval().save_pretrained(part, safe_serialization=True)
    config = json.loads((part / "config.json").read_text())  # transformers 5 writes only rope_parameters; the
    config.update(rotary_pct=hf_config["rotary_pct"], rotary_emb_base=hf_config["rotary_emb_base"])  # 4.x reads these
    (part / "config.json").write_text(json.dumps(config, indent=2))
    if not TOKENIZER.is_file():
        raise SystemExit(f"{TOKENIZER} not found: the converter needs the Pythia tokenizer")
    shutil.copyfile(TOKENIZER, part / "tokenizer.json")
    special = "<|endoftext|>"
    (part / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPTNeoXTokenizerFast", "bos_token": special, "eos_token": special, "unk_token": special,
        "model_max_length": hf_config["max_position_embeddings"], "add_bos_token": False, "add_eos_token": False}))
    os.replace(part, out)


def child(cmd, threads: int | None = None) -> dict | None:
    """Run cmd; its last stdout line parsed as JSON (None if it printed nothing). Exits with its stderr on failure."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def convert(a, hf: Path) -> dict:
    """{gguf type: path}, each made once (written to .part, then renamed)."""
    converter = a.converter or next(iter(sorted(glob.glob(CONVERTERS), reverse=True)), None)
    if converter is None:
        raise SystemExit(f"no converter at {CONVERTERS}: see the setup at the top of this file, or give --converter")
    paths = {t: hf.parent / f"model-{t}.gguf" for t in ("f32", "q8_0", "q4_0")}
    for t, path in paths.items():
        if path.is_file():
            continue
        part = path.with_name(path.name + ".part")
        print(f"making {path}", file=sys.stderr)
        if t == "q4_0":
            child([a.llama_python, __file__, "--worker", "quantize", "--path", str(paths["f32"]), "--out", str(part),
                   "--threads", str(max(a.threads))])
        else:
            child([a.llama_python, converter, str(hf), "--outtype", t, "--outfile", str(part)])
        os.replace(part, path)
    return paths


def bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read at this thread count: a torch sum over 1 GiB of fp32, median of 5."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def main(a):
    hf = Path(a.work_dir) / f"{a.model}-seed{a.seed}" / "hf"
    hf.parent.mkdir(parents=True, exist_ok=True)
    save_hf(a.model, hf, a.seed)
    ggufs = convert(a, hf)
    common = ["--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--seed", str(a.seed)]
    results = {}  # (threads, row, side) -> [worker JSON]
    for threads in a.threads:
        for r in range(a.repeats):
            for row in a.rows:
                cmds = {"ours": [sys.executable, __file__, "--worker", "ours", "--path", str(hf), "--row", row],
                        "llama.cpp": [a.llama_python, __file__, "--worker", "llama", "--path", str(ggufs[ROWS[row]])]}
                for side in (("ours", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "ours")):  # alternate who is first
                    out = child(cmds[side] + common + ["--threads", str(threads)], threads)
                    results.setdefault((threads, row, side), []).append(out)
    ceilings = {t: bandwidth(t) for t in a.threads}
    n = a.new_tokens
    print(f"{a.model} (random, seed {a.seed}), batch 1, prompt {a.prompt_len} + {n} new tokens, greedy, median of "
          f"{a.repeats}; decode = (N-1) / (t_N - t_1), e2e = N / t_N (prefill included)")
    for t, bw in ceilings.items():
        print(f"  {t} thread{'s' if t > 1 else ''}: streaming read (torch sum over 1 GiB fp32) {bw / 1e9:.1f} GB/s")
    head = f"{'thr':>3} {'row':14} {'side':9} {'decode tok/s':>12} {'e2e tok/s':>9} {'MB/token':>8} {'% ceiling':>9}"
    print(head + f" {'ours/llama.cpp decode':>21}")
    for threads in a.threads:
        for row in a.rows:
            decode = {}
            for side in ("ours", "llama.cpp"):
                runs = results[(threads, row, side)]
                decode[side] = statistics.median((n - 1) / (x["total_s"] - x["first_s"]) for x in runs)
                e2e = statistics.median(n / x["total_s"] for x in runs)
                nbytes = runs[0]["bytes"]
                share = decode[side] / (ceilings[threads] / nbytes)
                group = f" g{GROUP_SIZE}" if row.startswith("int4") else ""
                name = row + group if side == "ours" else ROWS[row].upper()
                ratio = f"{decode['ours'] / decode['llama.cpp']:21.2f}x" if side == "llama.cpp" else ""
                print(f"{threads:3d} {name:14} {side:9} {decode[side]:12.1f} {e2e:9.1f} {nbytes / 1e6:8.1f} "
                      f"{share:9.0%}{ratio}")
    print("greedy agreement, ours vs llama.cpp (first run):")
    for row in a.rows:
        ours, theirs = (results[(a.threads[0], row, s)][0]["tokens"] for s in ("ours", "llama.cpp"))
        same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        print(f"  {row:7} vs {ROWS[row].upper():5}: first {same} of {n} tokens agree; ours {ours[:8]}, "
              f"llama.cpp {theirs[:8]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", choices=["pythia-160m", "pythia-410m"],
                   help="preset whose shape the random model has (default pythia-160m)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to measure, each side given the same (default 1 2)")
    p.add_argument("--rows", nargs="+", default=["fp32", "int8", "int4"], choices=list(ROWS),
                   help="our weight formats to run, each against its GGUF type: fp32-F32, int8-Q8_0, int4-Q4_0 "
                        "(default all)")
    p.add_argument("--repeats", type=int, default=3,
                   help="child processes per side and row, alternating sides; medians are reported (default 3)")
    p.add_argument("--new-tokens", type=int, default=48,
                   help="greedy tokens generated per run, at least 2 (default 48)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (fixed random ids; default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the prompt (default 0)")
    p.add_argument("--work-dir", default="/tmp/gptneox-vs-llamacpp",
                   help="where the HF model and its GGUF files are cached, one folder per --model and --seed "
                        "(default /tmp/gptneox-vs-llamacpp); delete a file there to make it again")
    p.add_argument("--llama-python", default="/tmp/llama-venv/bin/python",
                   help="python of the venv holding llama-cpp-python, gguf and transformers<5 (see the setup above; "
                        "default /tmp/llama-venv/bin/python)")
    p.add_argument("--converter", default=None,
                   help=f"llama.cpp's convert_hf_to_gguf.py (default: the last match, by name, of {CONVERTERS})")
    p.add_argument("--worker", choices=["ours", "llama", "quantize"], default=None,
                   help="internal: run as a child process (ours / llama: one measurement, printed as a JSON line; "
                        "quantize: --path F32 GGUF to --out Q4_0)")
    p.add_argument("--path", help="internal, with --worker: the HF directory (ours) or GGUF file (llama, quantize)")
    p.add_argument("--row", choices=list(ROWS), help="internal, with --worker ours: the weight format")
    p.add_argument("--out", help="internal, with --worker quantize: the Q4_0 file to write")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the decode rate is timed after the first token)")
    if args.worker:
        args.threads = args.threads[0]
        {"ours": worker_ours, "llama": worker_llama, "quantize": worker_quantize}[args.worker](args)
    else:
        main(args)
