"""Convert GPT-NeoX checkpoints losslessly: Hugging Face (any layout) or gpt-neox DeepSpeed -> HF safetensors, and
HF -> gpt-neox model-states files at a chosen tensor-parallel degree.

    python convert_weights.py pythia-1.4b/ out/pythia-1.4b --dtype bf16 --verify
    python convert_weights.py global_step143000/ out/pythia-6.9b --neox-config 6-9B.yml --tokenizer 20B_tokenizer.json
    python convert_weights.py out/pythia-70m neox/global_step0 --to neox --tp 2 --verify
    python convert_weights.py dolly-v2-12b/ out/dolly-v2-12b-int4 --quantize int4 --group-size 128 --verify

DST is built beside itself under a hidden temporary name and renamed into place when complete, with the tokenizer,
generation-config and pipeline-code files of SRC beside the weights (both ways, so HF -> neox -> HF keeps them). A
DST that is, contains or lies inside SRC is refused; an existing DST that holds anything is replaced only with
--force, and only when all it holds is an earlier conversion's output as that conversion wrote it (its manifest,
.gptneox-manifest.json, lists every file): never a user's files, a training run or an edited conversion. A refused
command creates nothing. See docs/converting.md.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

from gptneox import cli
from gptneox.checkpoint import parse_size
from gptneox.convert import LOGITS_MAX_PARAMS, convert_hf, convert_neox, export_neox, source_kind

MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


def size_arg(text: str) -> int:
    """An argparse type: bytes in "5GB" (10^9), "500MiB" (2^20) or a plain number, at least one."""
    try:
        return parse_size(text, name="")  # argparse names the flag
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def given(**flags) -> list[str]:
    """The flags among flags (name -> value) that were set, spelled as on the command line."""
    return ["--" + name.replace("_", "-") for name, value in flags.items() if value is not None and value is not False]


def check_flags(*, to, tp, no_pipe, max_shard_size, neox_config, tokenizer, trust_pickle, verify, logits_max_params,
                quantize=None, group_size=None):
    """Flags that contradict each other: a usage error (exit 2) before anything is read."""
    if quantize is not None and to == "neox":
        raise cli.UsageError("--quantize: only with --to hf (gpt-neox's files hold float weights)")
    if group_size is not None and quantize != "int4":
        raise cli.UsageError("--group-size is the int4 group size: give it with --quantize int4")
    if to == "hf" and given(tp=tp, no_pipe=no_pipe):
        raise cli.UsageError(f"{', '.join(given(tp=tp, no_pipe=no_pipe))}: only with --to neox")
    hf_output_flags = given(max_shard_size=max_shard_size, neox_config=neox_config, tokenizer=tokenizer,
                            trust_pickle=trust_pickle)
    if to == "neox" and hf_output_flags:
        raise cli.UsageError(f"{', '.join(hf_output_flags)}: not with --to neox (it reads an HF source and writes "
                             "model-states files, not safetensors shards)")
    if logits_max_params is not None and not verify:
        raise cli.UsageError("--logits-max-params: only with --verify")


def check_source(kind: str, src, *, to, neox_config, tokenizer, trust_pickle, quantize=None):
    """Flags that do not fit the source found at src: a usage error too."""
    if quantize is not None and kind == "neox":
        raise cli.UsageError(f"--quantize needs a Hugging Face source, but {src} is a gpt-neox checkpoint; convert it "
                             "to HF first, then quantize that")
    if to == "neox" and kind == "neox":
        raise cli.UsageError(f"--to neox needs a Hugging Face source, but {src} is a gpt-neox checkpoint; convert it "
                             "to HF first, then back with --to neox --tp N")
    neox_source_flags = given(neox_config=neox_config, tokenizer=tokenizer, trust_pickle=trust_pickle)
    if kind == "hf" and neox_source_flags:
        raise cli.UsageError(f"{', '.join(neox_source_flags)}: only for a gpt-neox source, but {src} is a Hugging "
                             "Face checkpoint (it brings its own config and tokenizer files)")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main(*, src, dst, to, dtype, max_shard_size, verify, force, tp, no_pipe, neox_config, tokenizer, trust_pickle,
         logits_max_params, no_progress, quantize=None, group_size=None):
    check_flags(to=to, tp=tp, no_pipe=no_pipe, max_shard_size=max_shard_size, neox_config=neox_config,
                tokenizer=tokenizer, trust_pickle=trust_pickle, verify=verify, logits_max_params=logits_max_params,
                quantize=quantize, group_size=group_size)
    start = time.perf_counter()
    kind = source_kind(Path(src))
    check_source(kind, src, to=to, neox_config=neox_config, tokenizer=tokenizer, trust_pickle=trust_pickle,
                 quantize=quantize)
    common = dict(dtype=dtype, force=force, force_flag="--force", verify=verify, progress=not no_progress,
                  logits_max_params=LOGITS_MAX_PARAMS if logits_max_params is None else logits_max_params)
    shard_size = MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
    if to == "neox":
        summary = export_neox(src, dst, tp=tp or 1, pipe=not no_pipe, **common)
    elif kind == "neox":
        summary = convert_neox(src, dst, config_files=neox_config, tokenizer=tokenizer, trust_pickle=trust_pickle,
                               max_shard_size=shard_size, **common)
    else:
        quantized = dict(quantize=quantize, group_size=group_size or 128) if quantize else {}
        summary = convert_hf(src, dst, max_shard_size=shard_size, **common, **quantized)
    elapsed = time.perf_counter() - start
    print(f"{src} ({kind}) -> {dst} ({to}): " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    print(f"time {elapsed:.1f} s, peak host memory (max RSS) {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("src", help="source checkpoint directory: HF layout (config.json + .bin or .safetensors, "
                        "single or sharded) or a gpt-neox global_stepN directory (*model_states.pt)")
    parser.add_argument("dst", help="output directory; must not be, contain or lie inside SRC; built beside itself "
                        "under a temporary name and renamed into place when complete")
    parser.add_argument("--to", choices=("hf", "neox"), default="hf",
                        help="output layout: hf = safetensors shards + index + config.json (default); neox = "
                        "gpt-neox model-states files + configs/model.yml (the source must be HF)")
    parser.add_argument("--dtype", type=cli.dtype_arg(), default=None,
                        help="cast floating tensors to bf16 / bfloat16, fp16 / float16 or fp32 / float32 "
                        "(default: keep the stored dtype)")
    parser.add_argument("--max-shard-size", type=size_arg, default=None, metavar="SIZE",
                        help=f"HF output: largest safetensors shard, e.g. 5GB (10^9 bytes) or 500MiB (2^20); "
                        f"default {MAX_SHARD_SIZE}")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the output and check every tensor equals the source's bit for bit, and, for "
                        "a model of at most --logits-max-params parameters, that the logits are identical")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST, only if all it holds is an earlier conversion's output, "
                        "unchanged since (its .gptneox-manifest.json lists every file it wrote); anything else there "
                        "(a user's files, a training run, an edited file) is refused by name and nothing is touched. "
                        "Without it a DST that holds anything is refused")
    parser.add_argument("--tp", type=cli.positive_int, default=None, metavar="N",
                        help="--to neox: tensor-parallel degree to split into (1, 2, 4, ...; must divide heads, "
                        "intermediate size and vocab); default 1")
    parser.add_argument("--no-pipe", action="store_true",
                        help="--to neox: write mp_rank_XX_model_states.pt (pipe-parallel-size 0, as pythia-14m/31m) "
                        "instead of one layer_XX-model_YY file per pipeline layer")
    parser.add_argument("--neox-config", nargs="+", default=None, metavar="YML",
                        help="gpt-neox source: its YAML config file(s), merged in order "
                        "(default: SRC/configs/*.yml, else SRC/*.yml)")
    parser.add_argument("--tokenizer", default=None, metavar="JSON",
                        help="gpt-neox source: a tokenizers JSON file (e.g. gpt-neox's 20B_tokenizer.json) to copy "
                        "into DST as tokenizer.json (HF sources copy their own tokenizer files)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="gpt-neox source: allow unpickling non-tensor objects in *model_states.pt (DeepSpeed "
                        "engine state); this can run arbitrary code, so only for files you trust")
    parser.add_argument("--logits-max-params", type=cli.non_negative_int, default=None, metavar="N",
                        help=f"--verify: largest model whose logits are compared (default {LOGITS_MAX_PARAMS:,})")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="HF output: weight-only quantized linear weights (int8: one scale per output channel; "
                        "int4: groups of --group-size), written with \"quantization\" in config.json; the input "
                        "embedding stays float (docs/quantization.md)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=None,
                        help="--quantize int4: input columns per scale and zero (default 128)")
    parser.add_argument("--no-progress", "--quiet", action="store_true",
                        help="no progress bars on stderr (they are drawn by default; --quiet is an alias)")
    sys.exit(cli.run(main, parser))
