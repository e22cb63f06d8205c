"""lm-eval wall time (performance.md P13): the same offline multiple-choice task through lm-eval's own evaluator with
our model ("gptneox", gptneox/eval/) and with lm-eval's HFLM around transformers' GPTNeoXForCausalLM, on one
pythia-160m-shaped checkpoint (random init: numerics do not change speed), fp32, CPU, same results required.

    PYTHONPATH=. python benchmarks/bench_eval.py --tokenizer PATH/TO/pythia/tokenizer.json --repeats 3

1. The checkpoint: transformers' GPTNeoXForCausalLM in pythia-160m's shape (vocabulary padded to 50304 rows, as
   Pythia's, the padding rows' logits held at -1000 as training leaves them negligible), saved with Pythia's
   tokenizer (--tokenizer, default: EleutherAI/pythia-160m's, from the local hub cache or the hub), so both sides
   read the same files and tokenize alike.
2. The task: --docs generated questions (a short passage of --passage-sentences sentences about people, then a
   question), four multi-token choices each, acc and acc_norm: --docs x 4 loglikelihood requests, written as a
   JSON-lines file and a task YAML in a temporary --include_path, as a user writes a task of their own.
3. Timing: both models are built once (load time reported apart), then `lm_eval.simple_evaluate` on the task with
   each, batch size --batch-size, alternating which goes first for --repeats rounds after a warm-up of each; the median
   wall time is reported. Before anything is reported, the two runs' accuracies must be equal and every request's
   log-likelihood within 1e-4 (tests/test_eval.py's bound).

Prediction (written before measuring). HFLM scores each request as one row of context + continuation, projecting every
position to the 50304-row vocabulary; ours runs a context once for its four choices and projects only the
continuation positions. With contexts of ~70 tokens and continuations of ~4, per question HFLM computes
4 x 74 positions x (85 MFLOP of blocks + 39 MFLOP of head), ours 70 x 85 + 4 x 4 x 124: ~4.4x fewer FLOPs. Padding,
Python and the evaluator's own work (building requests, metrics) are shared and dilute that: expect 2.5-3.5x on wall
time, above the 1.5x target.
"""

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, like the other benchmarks with PYTHONPATH=.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TOL = 1e-4  # per-request log-likelihood, ours vs HFLM (tests/test_eval.py)
REAL_VOCAB = 50277  # Pythia's tokens; its embedding pads them to 50304 rows. HFLM's softmax includes the padding rows,
# ours does not (docs/evaluation.md): at random init they would differ by log(50304 / 50277) per token, so the
# checkpoint gives the padding rows the negligible probability that training gives them

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Henry", "Ida", "Jonas", "Lena", "Marco"]
TOWNS = ["Linden", "Ashford", "Brookvale", "Millbrook", "Stonehill", "Riverton", "Oakridge", "Fairport"]
ITEMS = ["apples", "loaves of bread", "eggs", "candles", "pears", "fish", "onions", "jars of honey"]
JOBS = ["baker", "teacher", "farmer", "doctor", "painter", "sailor", "tailor", "miller"]


# ------------------------------------------------------------------------------------------------------ the task
def documents(n: int, sentences: int, seed: int = 0) -> list[dict]:
    """n questions: a passage, a question about it, four choices (the right one at label)."""
    rng, docs = random.Random(seed), []
    for _ in range(n):
        people = rng.sample(NAMES, 4)
        facts = [(p, rng.choice(JOBS), rng.choice(TOWNS), rng.choice(ITEMS)) for p in people]
        passage = " ".join(f"{p} is a {job} in {town} who sells {item}." for p, job, town, item in facts)
        extra = " ".join(f"On market day {rng.choice(people)} walks to {rng.choice(TOWNS)}." for _ in range(sentences))
        who, job, town, item = rng.choice(facts)
        choices = [f" {item}", *(f" {i}" for i in rng.sample([i for i in ITEMS if i != item], 3))]
        label = rng.randrange(4)
        choices[0], choices[label] = choices[label], choices[0]
        docs.append(dict(passage=f"{passage} {extra}", question=f"What does {who}, the {job} from {town}, sell?",
                         choices=choices, label=label))
    return docs


def write_task(path: Path, docs: list[dict]) -> str:
    """The task YAML and its data under path, as lm-eval's --include_path reads them; the task's name."""
    data = path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (path / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{passage}}\\nQuestion: {{question}}\\nAnswer:\"\n"
        "doc_to_target: label\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return "bench_mc"


# ---------------------------------------------------------------------------------------------------- the models
def checkpoint(path: Path, tokenizer_file: str) -> None:
    """A random pythia-160m-shaped GPTNeoXForCausalLM and its tokenizer, saved in HF's layout at path."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
    from gptneox import Config
    torch.manual_seed(0)
    config = GPTNeoXConfig(**Config.from_name("pythia-160m").to_hf_config())
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():  # the padding rows' logits at -1000, as a trained Pythia's are negligible (REAL_VOCAB above)
        model.gpt_neox.final_layer_norm.weight[0], model.gpt_neox.final_layer_norm.bias[0] = 0.0, 1.0
        pad = model.lm_head.weight[REAL_VOCAB:]  # [27, C]
        pad.zero_()
        pad[:, 0] = -1000.0
    model.save_pretrained(path)
    special = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|padding|>")
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, **special).save_pretrained(path)


def tokenizer_file(arg) -> str:
    """--tokenizer, or Pythia's tokenizer.json found the way sample.py --ckpt finds a model."""
    if arg:
        if not Path(arg).is_file():
            raise SystemExit(f"bench_eval: --tokenizer {arg}: no such file")
        return arg
    from gptneox import hub
    try:
        return str(Path(hub.checkpoint_path("EleutherAI/pythia-160m")) / "tokenizer.json")
    except Exception as e:  # noqa: BLE001 (any resolution failure means the same thing here)
        raise SystemExit(f"bench_eval: Pythia's tokenizer was not found ({e}); pass --tokenizer PATH/tokenizer.json "
                         "(any Pythia checkpoint directory holds one)") from None


def models(path: Path, batch_size: int) -> tuple[dict, dict]:
    """{"gptneox": ours, "hf": HFLM} on the checkpoint at path, and each one's load seconds."""
    from lm_eval.models.huggingface import HFLM
    from gptneox.eval import GPTNeoXLM
    made, load = {}, {}
    for name, build in (("gptneox", GPTNeoXLM), ("hf", HFLM)):
        t0 = time.perf_counter()
        made[name] = build(pretrained=str(path), device="cpu", dtype="float32", batch_size=batch_size)
        load[name] = time.perf_counter() - t0
    return made, load


# ------------------------------------------------------------------------------------------------------- timing
def evaluate(lm, task: str, task_manager) -> tuple[float, dict]:
    """Seconds of one lm_eval.simple_evaluate of task with lm, and its results (samples logged)."""
    import lm_eval
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True)
    return time.perf_counter() - t0, out


def check_same(ours: dict, theirs: dict, task: str) -> float:
    """Equal accuracies and every request's log-likelihood within TOL; the largest difference."""
    for metric in ("acc,none", "acc_norm,none"):
        a, b = ours["results"][task][metric], theirs["results"][task][metric]
        if a != b:
            raise SystemExit(f"bench_eval: {metric} differs: gptneox {a} vs hf {b}")
    want = {(s["doc_id"], i): r[0] for s in theirs["samples"][task] for i, r in enumerate(s["resps"])}
    worst = 0.0
    for s in ours["samples"][task]:
        for i, r in enumerate(s["resps"]):
            worst = max(worst, abs(float(r[0][0]) - float(want[s["doc_id"], i][0])))
    if worst > TOL:
        raise SystemExit(f"bench_eval: a request's log-likelihood differs by {worst:.3g} (> {TOL:g})")
    return worst


def main(*, tokenizer, docs, passage_sentences, batch_size, repeats, threads):
    import lm_eval
    from lm_eval.tasks import TaskManager
    warnings.filterwarnings("ignore")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets")
        (tmp / "tasks").mkdir()
        task = write_task(tmp / "tasks", documents(docs, passage_sentences))
        task_manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
        checkpoint(tmp / "ckpt", tokenizer_file(tokenizer))
        lms, load = models(tmp / "ckpt", batch_size)
        runs = {name: [evaluate(lm, task, task_manager)] for name, lm in lms.items()}  # warm-up
        worst = check_same(runs["gptneox"][0][1], runs["hf"][0][1], task)
        times = {name: [] for name in lms}
        for r in range(repeats):
            for name in (list(lms) if r % 2 == 0 else list(lms)[::-1]):
                seconds, out = evaluate(lms[name], task, task_manager)
                times[name].append(seconds)
                runs[name].append((seconds, out))
        results = runs["gptneox"][0][1]["results"][task]
    report(times, load, worst, results, docs, batch_size, repeats, lm_eval.__version__)


def report(times, load, worst, results, docs, batch_size, repeats, lm_eval_version) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    ours, theirs = statistics.median(times["gptneox"]), statistics.median(times["hf"])
    print(f"# bench_eval {datetime.datetime.now():%Y-%m-%d %H:%M}: {cpu}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, lm-eval {lm_eval_version}, transformers "
          f"{importlib.metadata.version('transformers')}, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# pythia-160m shape, random init, fp32; task bench_mc: {docs} questions x 4 choices = {4 * docs} "
          f"loglikelihood requests, batch size {batch_size}; median of {repeats} runs after a warm-up, alternating")
    print(f"# same results: acc {results['acc,none']:.4f}, acc_norm {results['acc_norm,none']:.4f} on both; "
          f"largest per-request log-likelihood difference {worst:.2g}")
    print("\n| model | task wall time (s) | requests/s | load (s) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| lm-eval HFLM (transformers) | {theirs:.2f} | {4 * docs / theirs:.0f} | {load['hf']:.1f} | 1.00x |")
    print(f"| gptneox (gptneox.eval) | {ours:.2f} | {4 * docs / ours:.0f} | {load['gptneox']:.1f} | "
          f"**{theirs / ours:.2f}x** |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="Pythia's tokenizer.json (default: EleutherAI/pythia-160m's, from the local hub "
                                       "cache or the hub)")
    p.add_argument("--docs", type=int, default=100, help="questions in the task, 4 requests each (default 100)")
    p.add_argument("--passage-sentences", type=int, default=3,
                   help="extra sentences in each question's passage: longer shared contexts (default 3)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward on both sides (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    main(**vars(p.parse_args()))
