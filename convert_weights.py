"""Convert GPT-NeoX checkpoints losslessly: Hugging Face (any layout) or gpt-neox DeepSpeed -> HF safetensors, and
HF -> gpt-neox model-states files at a chosen tensor-parallel degree.

    python convert_weights.py pythia-1.4b/ out/pythia-1.4b --dtype bf16 --verify
    python convert_weights.py global_step143000/ out/pythia-6.9b --neox-config 6-9B.yml --tokenizer 20B_tokenizer.json
    python convert_weights.py out/pythia-70m neox/global_step0 --to neox --tp 2 --verify

See docs/converting.md.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

from gptneox.checkpoint import CheckpointError
from gptneox.convert import DTYPES, LOGITS_MAX_PARAMS, convert_hf, convert_neox, export_neox, source_kind


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main(*, src, dst, to, dtype, max_shard_size, verify, force, tp, no_pipe, neox_config, tokenizer, trust_pickle,
         logits_max_params, quiet):
    start = time.perf_counter()
    kind = source_kind(Path(src))
    common = dict(dtype=dtype, force=force, verify=verify, logits_max_params=logits_max_params)
    if to == "neox":
        if kind != "hf":
            raise CheckpointError(f"{src}: --to neox needs a Hugging Face checkpoint as the source")
        summary = export_neox(src, dst, tp=tp, pipe=not no_pipe, progress=not quiet, **common)
    elif kind == "neox":
        summary = convert_neox(src, dst, config_files=neox_config, tokenizer=tokenizer, trust_pickle=trust_pickle,
                               max_shard_size=max_shard_size, progress=not quiet, **common)
    else:
        summary = convert_hf(src, dst, max_shard_size=max_shard_size, progress=not quiet, **common)
    elapsed = time.perf_counter() - start
    print(f"{src} ({kind}) -> {dst} ({to}): " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    print(f"time {elapsed:.1f} s, peak host memory (max RSS) {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint directory: HF layout (config.json + .bin or .safetensors, "
                        "single or sharded) or a gpt-neox global_stepN directory (*model_states.pt)")
    parser.add_argument("dst", help="output directory; written beside it under a temporary name, renamed when done")
    parser.add_argument("--to", choices=("hf", "neox"), default="hf",
                        help="output layout: hf = safetensors shards + index + config.json (default); neox = "
                        "gpt-neox model-states files + configs/model.yml (source must be HF)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating tensors to this dtype (default: keep the stored dtype)")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB",
                        help="largest output shard, e.g. 5GB (10^9) or 500MiB (2^20); default 5GB")
    parser.add_argument("--verify", action="store_true",
                        help="re-read the output and check every tensor equals the source's bit for bit, and, for "
                        "a model of at most --logits_max_params parameters, that the logits are identical")
    parser.add_argument("--force", action="store_true", help="replace dst if it exists (never done without this)")
    parser.add_argument("--tp", type=int, default=1, help="--to neox: tensor-parallel degree to split into (1, 2, 4, "
                        "...; must divide heads, intermediate size and vocab); default 1")
    parser.add_argument("--no_pipe", "--no-pipe", action="store_true",
                        help="--to neox: write mp_rank_XX_model_states.pt (pipe-parallel-size 0, as pythia-14m/31m) "
                        "instead of one layer_XX-model_YY file per pipeline layer")
    parser.add_argument("--neox_config", "--neox-config", nargs="+", default=None, metavar="YML",
                        help="gpt-neox YAML config file(s) of a NeoX source, merged in order "
                        "(default: SRC/configs/*.yml, else SRC/*.yml)")
    parser.add_argument("--tokenizer", default=None, metavar="JSON",
                        help="NeoX source: a tokenizers JSON file (e.g. gpt-neox's 20B_tokenizer.json) to copy into "
                        "dst as tokenizer.json (HF sources copy their own tokenizer files)")
    parser.add_argument("--trust_pickle", "--trust-pickle", action="store_true",
                        help="NeoX source: allow unpickling non-tensor objects in *model_states.pt (DeepSpeed engine "
                        "state); this can run arbitrary code, so only for files you trust")
    parser.add_argument("--logits_max_params", "--logits-max-params", type=int, default=LOGITS_MAX_PARAMS,
                        help=f"--verify: largest model whose logits are compared (default {LOGITS_MAX_PARAMS:,})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    try:
        main(**vars(args))
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
