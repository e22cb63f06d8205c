"""Peak host memory of GPTNeoX.from_pretrained, as a multiple of the checkpoint's size.

Writes a random fp16 checkpoint of about --size-gb (Pythia-shaped: hidden 2048, vocab 50304), then loads it in a
fresh process and reports (peak RSS during the load - RSS before it) / checkpoint bytes. RSS includes the pages of
mmap'd files that the load touched, so the figure is an honest upper bound on what the load needs. The baseline is
taken after imports and after torch's one-time meta-device setup (a fixed ~150 MB of lazily imported modules).

    python benchmarks/bench_load_memory.py --size-gb 1.2 --form bin
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gptneox import Config, GPTNeoX


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_checkpoint(path: Path, size_gb: float, form: str) -> int:
    per_layer = 12 * 2048 * 2048 * 2  # ~bytes of one fp16 layer at hidden 2048
    layers = max(1, round((size_gb * 1e9 - 2 * 50304 * 2048 * 2) / per_layer))
    config = Config.from_name("pythia-1.4b", num_hidden_layers=layers)
    with torch.device("meta"):
        model = GPTNeoX(config)
    model = model.to_empty(device="cpu").half()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    if form == "safetensors":
        model.save_pretrained(path, max_shard_size="100GB")
    else:
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config.to_hf_config()))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".bin", ".safetensors"))


def measure(path: str, dtype: str | None, device: str | None) -> dict:
    with torch.device("meta"):  # torch's one-time meta-device setup (~150 MB of lazy imports) is not the load's
        GPTNeoX(Config(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
    before = rss_bytes()
    model = GPTNeoX.from_pretrained(path, dtype=getattr(torch, dtype) if dtype else None, device=device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_minus_before": peak - before, "dtype": str(model.embed_out.weight.dtype)}


def main(*, size_gb: float, form: str, dtype: str | None, device: str | None, measure_path: str | None):
    if measure_path:  # the child process: load and print one JSON line
        print(json.dumps(measure(measure_path, dtype, device)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="gptneox-mem-"))
    try:
        nbytes = write_checkpoint(tmp / "ckpt", size_gb, form)
        cmd = [sys.executable, __file__, "--measure-path", str(tmp / "ckpt"), "--form", form]
        cmd += ["--dtype", dtype] if dtype else []
        cmd += ["--device", device] if device else []
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = result["peak_minus_before"] / nbytes
    print(f"{form} checkpoint {nbytes / 1e9:.2f} GB -> {result['dtype']} on {device or 'cpu'}: peak host memory "
          f"{result['peak_minus_before'] / 1e9:.2f} GB = {ratio:.2f}x the checkpoint")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size to write (default 1.2 GB)")
    parser.add_argument("--form", choices=["bin", "safetensors"], default="bin", help="file format (default bin)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="dtype to load into (default: the stored fp16)")
    parser.add_argument("--device", default=None, help="device to load onto (default cpu)")
    parser.add_argument("--measure-path", default=None, help=argparse.SUPPRESS)
    main(**vars(parser.parse_args()))
