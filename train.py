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
0 done, 2 a usage error, 1 a runtime error (bad data, a failed save, a NaN loss), 130 Ctrl-C.
"""

import sys

from gptneox.cli import ArgumentParser
from gptneox.cli import run as run_cli
from gptneox.train import loop
from gptneox.train.config import TrainConfig, parser


def main(**flags) -> None:
    """Train with flags, TrainConfig's fields (every value checked before any work): gptneox.train.loop.train."""
    loop.train(TrainConfig(**flags))


def build_parser() -> ArgumentParser:
    """train.py's flags, one per TrainConfig field (gptneox/train/config.py), this docstring their description."""
    return parser(__doc__, prog="train.py")


def cli(argv=None) -> int:
    """Run train.py with argv (default: sys.argv); returns the exit status (see the module docstring)."""
    return run_cli(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
