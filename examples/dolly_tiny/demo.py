"""The whole Dolly path offline on a CPU in under a minute (40 s on 2 idle cores): tokenizer, training, then an
answer from sample.py.

    python examples/dolly_tiny/demo.py

1. trains a small byte-level BPE tokenizer (the 20B tokenizer's design: NFC, byte-level BPE, <|endoftext|> = 0,
   <|padding|> = 1, plus Dolly's three special tokens) on instructions.jsonl, a set of 61 instructions written for
   this project, so nothing is downloaded;
2. trains a tiny randomly initialised GPT-NeoX on them with train.py, Dolly's recipe (loss on the response only);
3. asks the trained model one of the instructions through sample.py, which sees Dolly's special tokens in the
   tokenizer and so wraps the prompt in Dolly's template and prints the response up to "### End".

The model memorises its 61 answers; it shows that the pipeline works end to end, not that it generalises. Run again,
the demo asks the model it trained the first time (in --out, default out/dolly-tiny: delete it to train again).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = HERE / "instructions.jsonl"
SPECIALS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in the GPT-NeoX-20B tokenizer
DOLLY_SPECIALS = ["### End", "### Instruction:", "### Response:\n"]  # Dolly's, appended after the vocabulary
# a GPT-NeoX of 1.06M parameters (vocab 1024): big enough to memorise 61 answers in a few hundred steps on two CPU cores
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=512)


def train_tokenizer(path: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer.json trained on the instruction set (plus the template's words); its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    sys.path.insert(0, str(ROOT))
    from gptneox.prompts.dolly import format_training
    records = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [format_training(r["instruction"], r["response"], r.get("context") or None) for r in records]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(DOLLY_SPECIALS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


def write_config(path: Path, vocab: int) -> None:
    """config.json for train.py --config: the tiny shape, vocab padded to a multiple of 128 as gpt-neox does."""
    sys.path.insert(0, str(ROOT))
    from gptneox import Config
    config = Config(vocab_size=-(-vocab // 128) * 128, **TINY)
    path.write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")


def run(cmd: list[str]) -> None:
    """Run a script with one CPU thread: a model this small spends more time synchronising threads than computing
    (measured on 2 cores: 42 s on one thread against 155 s on two for the training step, the other core busy)."""
    print("$", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if status:
        raise SystemExit(f"demo: {cmd[1]} failed with exit status {status}")


def trained(out: Path, steps: int) -> bool:
    """OUT holds this demo's finished run: its exported model, trained for `steps` steps."""
    run_file = out / "run.json"
    return (out / "model.safetensors").is_file() and run_file.is_file() and \
        json.loads(run_file.read_text()).get("max_steps") == steps


def main(*, out, steps, prompt, context):
    out = Path(out).resolve()
    if trained(out, steps):  # run again: the model trained last time answers (a demo is run again and again)
        print(f"using the model trained in {out} (delete it to train again)", flush=True)
    else:
        work = out.parent / f"{out.name}-init"
        vocab = train_tokenizer(work / "tokenizer.json", vocab_size=1000)
        write_config(work / "config.json", vocab)
        print(f"tokenizer: {vocab} tokens; model: {TINY}", flush=True)
        resume = ["--resume"] if list((out / "checkpoints").glob("step-*.pt")) else []  # stopped while exporting
        run([sys.executable, "train.py", "--config", str(work / "config.json"), "--tokenizer",
             str(work / "tokenizer.json"), "--data", str(DATA), "--out", str(out), "--max-steps", str(steps),
             "--batch-size", "16", "--micro-batch-size", "16", "--lr", "3e-3",
             "--warmup-steps", "4", "--schedule", "cosine", "--val-size", "0", "--eval-every", "0",
             "--sample-every", "0", "--save-every", str(steps), "--device", "cpu", "--dtype", "fp32", *resume])
    ask = [sys.executable, "sample.py", "--ckpt", str(out), "--prompt", prompt, "--temperature", "0",
           "--max-new-tokens", "64", "--device", "cpu"]
    run(ask + (["--context", context] if context else []))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/dolly-tiny", help="where train.py writes the model (default out/dolly-tiny)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of 16 examples (default 150)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the instruction to answer")
    p.add_argument("--context", help="an Input: block for the instruction (e.g. for the closed_qa records)")
    main(**vars(p.parse_args()))
