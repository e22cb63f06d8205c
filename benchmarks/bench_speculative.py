"""Speculative greedy decoding on CPU (docs/performance.md P12: >= 1.6x the target alone, at identical output), with a
target and a draft that this script trains itself, on the same text, so that the draft is a real predictor of the
target (as pythia-160m is of pythia-2.8b).

    PYTHONPATH=. python benchmarks/bench_speculative.py              # trains once (~6 min idle), then ~5 min of timing
    PYTHONPATH=. python benchmarks/bench_speculative.py --repeats 7 --ks 2 4 6 8
    PYTHONPATH=. python benchmarks/bench_speculative.py --retrain    # train again although --work holds the models

1. Text: "structured English" generated here (nothing is downloaded): paragraphs about the people of a few towns,
   ten sentence templates in a fixed order, each kept with probability 0.7, their slots drawn from Zipf-weighted word
   lists, and names, places and items that recur within a paragraph (copying them needs attention). Training text
   and held-out text are drawn with different seeds.
2. Tokenizer: a byte-level BPE trained on the training text (the 20B tokenizer's design, as in
   examples/dolly_tiny/demo.py); the text's words run out of merges near 700 tokens, so the vocabulary is ~700
   (padded to 768 in the models).
3. Models: TARGET (C 1024, 6 layers, ~81M parameters) and DRAFT (C 256, 2 layers, ~2M: 40x smaller), both
   pretrained from random init by train.py on the training text, fp32. They are cached under --work with the
   recipe that made them; a different recipe or --retrain trains again.
4. Timing: greedy decoding at batch 1 of --prompts prompts (the first --prompt-tokens tokens of held-out
   paragraphs), --new-tokens each, no stop token: the target alone (one Generator) against speculative decoding
   with each k in --ks (one Generator per k). One warm-up pass of every side, then --repeats rounds, each timing
   one pass of every side in an order that rotates from round to round; the median pass is reported. Every pass's
   tokens are compared with the target alone's, token for token, before anything is reported.

The cost model (Leviathan et al. 2023, gptneox.speculative.predicted_speedup): with acceptance rate a, k drafts and
c = one draft forward's time over one target forward's, an iteration yields E = (1 - a^(k+1)) / (1 - a) tokens for
k c + 1 target-forward times. The paper's c takes the target forward to cost the same for 1 token and for the k + 1
it verifies. Measured here: t_step = the target alone's seconds per token (its decode step, prefill amortised),
t_verify = seconds per verifying target forward and t_draft = seconds per draft forward (both from
speculative.Stats). Two predictions are printed beside the measured speedup:
    paper's:          predicted_speedup(a, k, t_draft / t_step)              (verify costs one step)
    verify measured:  E / (k t_draft / t_step + t_verify / t_step)          (what an iteration costs here)

Prediction (written before measuring). On this 2-core AVX2 EPYC, MKL's fp32 GEMM of 2-8 rows against a 64 MB weight
takes 10-15 ms against 4.2 ms for the one-row GEMV (measured with torch.nn.functional.linear), so verifying k + 1
tokens costs ~2x a one-token step of the target (probe at this shape: 25 ms for 1 token, 50-63 ms for 3-7), not
1x as on a GPU or as the paper assumes. The draft's forward is ~1.5-3 ms (Python overhead of 2 layers), c ~ 0.07. The
text is regular, so acceptance ~0.9. Then: paper's prediction 2.4x / 3.2x / 3.7x for k = 2 / 4 / 6, verify-measured
prediction ~1.2x / 1.6x / 1.9x, and the measured speedup close to the latter: k = 2 short of 1.6x, k = 4 near it,
k = 6 above it if acceptance holds at 0.9.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, like the other benchmarks with PYTHONPATH=.

from gptneox import Config, GPTNeoX  # noqa: E402
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator  # noqa: E402
from gptneox.generation.speculative import Stats, predicted_speedup  # noqa: E402
from gptneox.tokenizer import Tokenizer  # noqa: E402

# ------------------------------------------------------------------------------------------------------ the text
NAMES = [("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
         ("Greta", "she"), ("Henry", "he"), ("Ida", "she"), ("Jonas", "he"), ("Lena", "she"), ("Marco", "he"),
         ("Nora", "she"), ("Oscar", "he"), ("Paula", "she"), ("Rafael", "he")]
JOBS = ["baker", "teacher", "farmer", "doctor", "painter", "sailor", "tailor", "miller", "carpenter", "gardener"]
TOWNS = ["Linden", "Ashford", "Brookvale", "Millbrook", "Stonehill", "Riverton", "Oakridge", "Fairport"]
PLACES = ["market", "harbour", "library", "bakery", "mill", "school", "square", "station"]
ITEMS = ["apples", "loaves of bread", "eggs", "candles", "pears", "fish", "onions", "jars of honey"]
FOODS = ["soup", "bread and cheese", "a fish pie", "potato stew", "a bowl of rice", "pancakes"]
TOPICS = ["the sea", "old ships", "the stars", "birds", "the history of the town", "mountains", "gardens"]
VIEWS = ["garden", "street", "river", "hills"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
HOURS = ["five", "six", "seven", "eight"]
WEATHER = ["rains", "snows", "is windy", "is cold"]
KEEP = 0.7  # each sentence of a paragraph appears with this probability, in the templates' order
TRAIN_PARAGRAPHS, HELD_OUT_PARAGRAPHS = 6000, 200  # 6000 paragraphs = 2.97 MB = ~670k tokens, more than training reads
TRAIN_SEED, HELD_OUT_SEED = 0, 1

# ---------------------------------------------------------------------------------------------------- the models
VOCAB = 1000  # asked of the BPE trainer; the text's words run out of merges before it (~700)
SHAPES = {  # GPT-NeoX shapes, Pythia's layout (parallel residual, rotary on a quarter of each head)
    # bound by weight bandwidth at decode: 0.3 GB of fp32 weights read per token (~25 ms on this machine)
    "target": dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, intermediate_size=4096),
    # bound by Python overhead: 2 layers is the fewest that can copy a name from context (an induction head)
    "draft": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
}
CONTEXT = 1024  # max_position_embeddings; speculation's cache holds prompt + (N + 1) (k + 1) slots
# train.py settings per model (docs/training.md). The target is trained on 2 threads (bound by GEMMs), the draft on 1
# (a model this small spends more time synchronising threads than computing: examples/dolly_tiny/demo.py).
TRAINING = {
    "target": dict(batch_size=8, lr=1.5e-3, warmup_steps=10, threads=2),  # 1024 tokens a step, ~4 s on 2 idle cores
    "draft": dict(batch_size=16, lr=3e-3, warmup_steps=20, threads=1),
}
SEQ_LEN = 128  # packed training windows


def zipf(rng, xs):
    """One of xs, the i-th with weight 1 / (i + 1): every slot has a most likely value, as words in English do."""
    return rng.choices(xs, weights=[1 / (i + 1) for i in range(len(xs))])[0]


def paragraph(rng) -> str:
    """One paragraph about one person: an opening sentence, then each of ten templates with probability KEEP."""
    name, he = zipf(rng, NAMES)
    friend = zipf(rng, [f for f, _ in NAMES if f != name])
    his = {"he": "his", "she": "her"}[he]
    job, town, place, item = zipf(rng, JOBS), zipf(rng, TOWNS), zipf(rng, PLACES), zipf(rng, ITEMS)
    sentences = [
        f"{name} wakes up at {zipf(rng, HOURS)} o'clock every morning.",
        f"After breakfast {he} opens the window and looks at the {zipf(rng, VIEWS)}.",
        f"Every {zipf(rng, DAYS)}, {name} walks to the {place} and buys {zipf(rng, NUMBERS)} {item}.",
        f"At the {place}, {he} meets {friend}, and they talk about {zipf(rng, TOPICS)}.",
        f"{friend} asks {name} for {zipf(rng, NUMBERS)} {item}, and {name} gives {friend} the {item}.",
        f"In the afternoon {name} works until {zipf(rng, HOURS)} o'clock, because a {job} has a lot to do.",
        f"In the evening {name} cooks {zipf(rng, FOODS)} for {his} family.",
        f"When it {zipf(rng, WEATHER)} in {town}, {name} stays at home and reads a book about {zipf(rng, TOPICS)}.",
        f"On {zipf(rng, DAYS)} {name} and {friend} take the train from {town} to {zipf(rng, TOWNS)}.",
        f"{friend} says that {town} is the best town for a {job}, and {name} agrees with {friend}.",
    ]
    kept = [s for s in sentences if rng.random() < KEEP]
    return " ".join([f"{name} is a {job} in {town}."] + kept)


def corpus(paragraphs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [paragraph(rng) for _ in range(paragraphs)]


# ----------------------------------------------------------------------------------------- tokenizer, training
def train_tokenizer(text_file: Path, path: Path) -> int:
    """A byte-level BPE tokenizer.json trained on the text (<|endoftext|> = 0, <|padding|> = 1); its size."""
    from tokenizers import Tokenizer as BPETokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = BPETokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_file)], trainer)
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


def recipe(steps: dict, text: str) -> dict:
    """Everything the trained models depend on (the text by its hash); a cache of another recipe is not reused."""
    return dict(shapes=SHAPES, training=TRAINING, steps=steps, seq_len=SEQ_LEN, vocab=VOCAB, context=CONTEXT,
                text_sha256=hashlib.sha256(text.encode()).hexdigest())


def train_model(work: Path, name: str, vocab: int, steps: int) -> float:
    """Pretrain work/name with train.py on work/train.txt; seconds taken."""
    config = Config(vocab_size=-(-vocab // 128) * 128, max_position_embeddings=CONTEXT, **SHAPES[name])
    (work / f"{name}.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
    t, out = TRAINING[name], work / name
    shutil.rmtree(out, ignore_errors=True)  # train.py refuses an --out that holds another run
    cmd = [sys.executable, "train.py", "--config", str(work / f"{name}.json"), "--tokenizer", str(work / "tokenizer.json"),
           "--data", str(work / "train.txt"), "--out", str(out), "--max-steps", str(steps), "--seq-len", str(SEQ_LEN),
           "--batch-size", str(t["batch_size"]), "--micro-batch-size", str(t["batch_size"]), "--lr", str(t["lr"]),
           "--schedule", "cosine", "--warmup-steps", str(t["warmup_steps"]), "--device", "cpu", "--dtype", "fp32",
           "--val-size", "0", "--eval-every", "0", "--save-every", "0", "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(t["threads"]), "PYTHONPATH": str(ROOT)}
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        raise SystemExit(f"bench_speculative: training the {name} failed")
    shutil.rmtree(out / "checkpoints")  # the resumable training state (~1 GB with Adam's moments); the export stays
    return time.perf_counter() - t0


def prepare(work: Path, steps: dict, retrain: bool) -> dict:
    """The text, tokenizer and both models under work, trained unless a cache of the same recipe is there."""
    text = "\n\n".join(corpus(TRAIN_PARAGRAPHS, TRAIN_SEED)) + "\n"
    stamp, want = work / "recipe.json", json.loads(json.dumps(recipe(steps, text)))  # as it reads back from JSON
    if not retrain and stamp.exists() and json.loads(stamp.read_text())["recipe"] == want:
        return json.loads(stamp.read_text())
    work.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    (work / "train.txt").write_text(text, encoding="utf-8")
    vocab = train_tokenizer(work / "train.txt", work / "tokenizer.json")
    seconds = {name: train_model(work, name, vocab, steps[name]) for name in ("draft", "target")}
    done = dict(recipe=want, vocab=vocab, train_seconds=seconds, date=datetime.date.today().isoformat())
    stamp.write_text(json.dumps(done, indent=2) + "\n")
    return done


def final_loss(work: Path, name: str, last: int = 10) -> float:
    """Mean training loss of the last `last` steps (train.py's metrics.jsonl)."""
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.mean(r["loss"] for r in rows[-last:])


# ------------------------------------------------------------------------------------------------------- timing
def prompts(tok: Tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """The first `length` tokens [1, length] of n held-out paragraphs (each at least that long)."""
    ids = (tok.encode(p) for p in corpus(HELD_OUT_PARAGRAPHS, HELD_OUT_SEED))
    out = [torch.tensor([i[:length]]) for i in ids if len(i) >= length][:n]
    assert len(out) == n, f"only {len(out)} held-out paragraphs have {length} tokens"
    return out


def decode_pass(side, batch: list[torch.Tensor]) -> tuple[float, list]:
    """Seconds to decode every prompt in turn at batch 1 with side = (Generator, GenerationConfig), and the new ids
    [1, N] of each."""
    gen, config = side
    t0 = time.perf_counter()
    outs = [gen.generate(ids, config) for ids in batch]
    return time.perf_counter() - t0, outs


def check_same(name: str, outs: list, reference: list) -> None:
    """Speculative greedy output must be the target's, token for token: stop with the first difference if not."""
    for i, (a, b) in enumerate(zip(outs, reference)):
        if not torch.equal(a, b):
            j = int((a != b).long().argmax()) if a.shape == b.shape else min(a.shape[1], b.shape[1])
            raise SystemExit(f"bench_speculative: {name} differs from the target alone on prompt {i} at new token {j}: "
                             f"{a[0, j:j + 8].tolist()} vs {b[0, j:j + 8].tolist()}; a bug in speculative decoding")


def time_sides(sides: dict, batch, repeats: int) -> tuple[dict, dict, list]:
    """Median seconds per pass of each side (name -> (Generator, GenerationConfig)), alternating in an order that
    rotates from round to round, after a warm-up pass of each; every pass checked against the target alone's
    output. Also each speculative side's Stats over the timed passes, and the reference output."""
    names = list(sides)
    reference = decode_pass(sides[names[0]], batch)[1]  # the warm-up of the target alone
    for name in names[1:]:
        check_same(name, decode_pass(sides[name], batch)[1], reference)  # their warm-ups
    before = {name: sides[name][0].stats.since(None) for name in names[1:]}  # copies: the warm-up's counts
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # no side is always first
            seconds, outs = decode_pass(sides[name], batch)
            check_same(name, outs, reference)
            times[name].append(seconds)
    stats = {name: sides[name][0].stats.since(before[name]) for name in names[1:]}
    return {name: statistics.median(ts) for name, ts in times.items()}, stats, reference


# ------------------------------------------------------------------------------------------------------ report
def header(work: Path, made: dict, models: dict, settings: str) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    print(f"# bench_speculative {datetime.datetime.now():%Y-%m-%d %H:%M}: {cpu}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"# {name}: {SHAPES[name]}, vocab {model.config.vocab_size}, {n / 1e6:.2f}M parameters fp32, trained "
              f"{made['recipe']['steps'][name]} steps x {TRAINING[name]['batch_size']} x {SEQ_LEN} tokens in "
              f"{made['train_seconds'][name]:.0f} s ({made['date']}), loss of the last 10 steps {final_loss(work, name):.3f}")
    print(f"# {settings}")


def row(name: str, k: int, seconds: float, plain_s: float, stats: Stats, t_step: float, tokens: int) -> str:
    """One markdown row: the measured speedup beside the paper's and the verify-measured predictions."""
    a = stats.acceptance_rate
    t_draft, t_verify = stats.draft_s / stats.draft_forwards, stats.target_s / stats.target_forwards
    expected = predicted_speedup(a, k, 0.0)  # E = (1 - a^(k+1)) / (1 - a): tokens per iteration
    paper = predicted_speedup(a, k, t_draft / t_step)
    verify_measured = expected / (k * t_draft / t_step + t_verify / t_step)
    return (f"| speculative, {name} | {tokens / seconds:.1f} | **{plain_s / seconds:.2f}x** | {a:.3f} | "
            f"{stats.tokens_per_target_forward:.2f} ({expected:.2f}) | {t_draft * 1e3:.2f} ms = {t_draft / t_step:.3f} | "
            f"{t_verify * 1e3:.1f} ms = {t_verify / t_step:.2f} | {paper:.2f}x | {verify_measured:.2f}x |")


def report(medians: dict, stats: dict, ks: list[int], tokens: int) -> None:
    plain_s = medians["target alone"]
    t_step = plain_s / tokens  # the target alone's seconds per new token (its decode step, prefill amortised)
    print("\n| side | tokens/s | speedup | acceptance a | tokens / target forward (E from a) | t_draft = c t_step | "
          "t_verify = r t_step | predicted, paper's (verify = 1 step) | predicted, verify measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| target alone | {tokens / plain_s:.1f} | 1.00x | | 1 | | t_step = {t_step * 1e3:.1f} ms | | |")
    for k in ks:
        name = f"k = {k}"
        print(row(name, k, medians[name], plain_s, stats[name], t_step, tokens))


def main(*, work, retrain, ks, new_tokens, prompt_tokens, prompts_, repeats, threads, target_steps, draft_steps):
    work = Path(work).resolve()
    made = prepare(work, {"target": target_steps, "draft": draft_steps}, retrain)
    torch.set_num_threads(threads)
    tok = Tokenizer.from_pretrained(work / "tokenizer.json")
    models = {name: GPTNeoX.from_pretrained(work / name, dtype=torch.float32).eval() for name in ("target", "draft")}
    header(work, made, models, f"greedy, batch 1, {prompts_} held-out prompts of {prompt_tokens} tokens + "
           f"{new_tokens} new each, fp32; median pass of {repeats} after a warm-up, sides alternating")
    batch = prompts(tok, prompts_, prompt_tokens)
    greedy = GenerationConfig(max_new_tokens=new_tokens, temperature=0, eos_token_id=[])
    sides = {"target alone": (Generator(models["target"]), greedy)}
    for k in ks:  # one Generator per side, held across passes (its caches are reused)
        sides[f"k = {k}"] = (Generator(models["target"], draft_model=models["draft"]),
                             GenerationConfig.of(greedy, num_draft_tokens=k))
    medians, stats, reference = time_sides(sides, batch, repeats)
    report(medians, stats, ks, len(batch) * new_tokens)
    print(f"\nEvery speculative pass gave the target alone's {new_tokens} tokens on every prompt. Prompt 0 and its "
          f"continuation:\n{tok.decode(batch[0][0].tolist())!r}\n-> {tok.decode(reference[0][0].tolist())!r}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/bench-speculative",
                   help="where the text, tokenizer and trained models are kept between runs (default "
                        "out/bench-speculative)")
    p.add_argument("--retrain", action="store_true", help="train the tokenizer and both models again even if --work "
                   "holds them (they are retrained anyway when the recipe in this script changed)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6],
                   help="numbers of draft tokens per target forward to time, one speculative side each (default 2 4 6)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--prompts", dest="prompts_", type=int, default=4,
                   help="held-out prompts decoded one after another in each timed pass (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per side; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads while timing (default 2, the machine's cores)")
    p.add_argument("--target-steps", type=int, default=80,
                   help="training steps of the target, 8 x 128 tokens each (default 80, ~5 min on 2 idle cores)")
    p.add_argument("--draft-steps", type=int, default=300,
                   help="training steps of the draft, 16 x 128 tokens each (default 300, ~1 min on 1 idle core)")
    main(**vars(p.parse_args()))
