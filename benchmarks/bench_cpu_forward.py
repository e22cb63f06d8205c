"""CPU forward throughput, ours vs Hugging Face transformers, same weights, same process, fp32.

A randomly initialised pythia-160m-shaped model (numerics do not change speed). Both sides run alternately after a
warm-up; each reports the median of --repeats timed forwards, in tokens/s (B * T / seconds), and the ratio.

    python benchmarks/bench_cpu_forward.py --batch-size 1 --seq-len 512
"""

import argparse
import platform
import statistics
import time
import warnings

import torch

from gptneox import Config, GPTNeoX


def hf_twin(model: GPTNeoX, attn_implementation: str):
    """transformers' GPTNeoXForCausalLM holding exactly our weights."""
    warnings.filterwarnings("ignore")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(model.config.to_hf_config()))
    hf.config._attn_implementation = attn_implementation
    state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@torch.inference_mode()
def seconds(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main(*, model_name: str, batch_size: int, seq_len: int, repeats: int, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPTNeoX(Config.from_name(model_name), backend="sdpa").eval()
    model.init_weights()
    hf = hf_twin(model, "sdpa")
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)  # correct first
    sides = {"gptneox": model, "transformers": lambda ids: hf(ids).logits}
    times = {name: [] for name in sides}
    for _ in range(2):  # warm-up
        for fn in sides.values():
            seconds(fn, x)
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(seconds(fn, x))
    tokens = batch_size * seq_len
    print(f"{model_name} shape, fp32, B={batch_size} T={seq_len}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"  {name:13s} {tokens / statistics.median(ts):10.0f} tokens/s  (median of {repeats})")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["gptneox"])
    print(f"  ratio gptneox / transformers: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="pythia-160m", help="preset whose shape to use (default pythia-160m)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per side (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    main(**vars(parser.parse_args()))
