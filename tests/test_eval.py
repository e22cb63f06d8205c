"""gptneox.eval against lm-eval's own HFLM on the same tiny random checkpoints, offline.

Each checkpoint is a transformers GPTNeoXForCausalLM saved with an HF tokenizer built from the real Pythia (or Dolly)
tokenizer.json, so HFLM and GPTNeoXLM read the same files. The model's vocabulary is padded to 50304 rows like
Pythia's; in the reference checkpoint the 27 padding rows get a logit of -1000 (trained Pythia never predicts them),
so HFLM's softmax over all 50304 rows and ours over the 50277 real tokens agree, and a second checkpoint makes the
padding rows win to show what the cut is for. lm-eval and the real tokenizer are required: the tests skip without.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra: pip install -e '.[eval]'")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", module="lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from tiny import hf_model  # noqa: E402

from gptneox.prompts.dolly import END_KEY, format_prompt  # noqa: E402
from gptneox.eval import MODEL_ARGS, GPTNeoXLM, main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHIA_TOKENS, PADDED_ROWS = 50277, 50304  # Pythia's tokenizer and embedding sizes
CONTEXT = 64  # max_position_embeddings of the tiny models: short, so windows and truncation are cheap
LL_TOL = 1e-4  # the bound on a summed log-likelihood vs HFLM (fp32; the observed difference is ~1e-6)
BATCH_TOL = 1e-5  # batch size 1 vs 16
REQUESTS = [  # (context, continuation): the cases HFLM's conventions treat specially
    ("", "hello"),  # empty context: the prefix token <|endoftext|> stands in
    ("", "<|endoftext|> starts with the prefix"),  # ... unless the continuation starts with it
    ("The cat ", "sat on the mat"),  # trailing space moves into the continuation
    ("The cat\n\n", "Then"),  # so does trailing newline
    ("The cat", " sat"),  # one token
    ("The cat", " sat on the mat and looked around"),  # many tokens, same context as the next two
    ("The cat", " ran"),
    ("The cat", " jumped over the dog"),
    ("héllo 世界", " ✓ done — ok"),  # Unicode, multi-byte tokens
    ("a    b", "    c"),  # whitespace-run tokens
    ("<|endoftext|>Already prefixed", " text"),
]


def save_with_tokenizer(model, tokenizer_file, path) -> str:
    from transformers import PreTrainedTokenizerFast
    model.save_pretrained(path)
    special = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|padding|>")
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, **special).save_pretrained(path)
    return str(path)


def tiny_padded(seed: int, padding_logit: float, vocab_size=PADDED_ROWS, boost=()):
    """A tiny model whose final layer norm emits a constant 1 in feature 0, so that embed_out rows past the real
    vocabulary (and the ids in boost) have the fixed logit padding_logit (and +1000)."""
    model = hf_model(seed, vocab_size=vocab_size, max_position_embeddings=CONTEXT)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = 0.0
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        w = model.lm_head.weight  # [vocab_size, C] (embed_out on disk)
        w[PYTHIA_TOKENS:] = 0.0
        w[PYTHIA_TOKENS:, 0] = padding_logit
        for i in boost:
            w[i] = 0.0
            w[i, 0] = 1000.0
    return model


@pytest.fixture(scope="module")
def ckpt(shared_data, tmp_path_factory):
    """The reference checkpoint: padding rows at -1000, Pythia's tokenizer."""
    return save_with_tokenizer(tiny_padded(0, -1000.0), os.path.join(shared_data, "pythia-tokenizer.json"),
                               tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def hflm(ckpt):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=16)


@pytest.fixture(scope="module")
def ours(ckpt):
    return GPTNeoXLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=16)


def instances(kind, args):
    return [Instance(kind, {}, a, i, metadata=("handmade", i, 1)) for i, a in enumerate(args)]


def greedy_requests(hflm, contexts):
    """(context, HFLM's greedy continuation) pairs: their is_greedy flag can be True."""
    gen = hflm.generate_until(instances("generate_until", [(c, {"until": [], "max_gen_toks": 4}) for c in contexts]),
                              disable_tqdm=True)
    return [(c, g) for c, g in zip(contexts, gen) if g]


def assert_loglikelihoods_match(got, want, tol, what):
    assert [g for _, g in got] == [g for _, g in want], f"{what}: is_greedy flags differ"
    worst = max(abs(a - b) for (a, _), (b, _) in zip(got, want))
    assert worst <= tol, f"{what}: max |difference| {worst:.3g} exceeds {tol:g}"


# ---------------------------------------------------------------------------------------------- HFLM parity
def test_loglikelihood_matches_hflm(ours, hflm):
    requests = REQUESTS + greedy_requests(hflm, ["The cat", "Once upon a time", "1 2 3"])
    want = hflm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    got = ours.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    assert any(g for _, g in want), "no greedy continuation among the requests: the flag is not exercised"
    assert_loglikelihoods_match(got, want, LL_TOL, "loglikelihood vs HFLM")


def test_loglikelihood_batch_size_1_equals_16(ckpt, ours):
    one = GPTNeoXLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=1)
    got = one.loglikelihood(instances("loglikelihood", REQUESTS), disable_tqdm=True)
    want = ours.loglikelihood(instances("loglikelihood", REQUESTS), disable_tqdm=True)
    assert_loglikelihoods_match(got, want, BATCH_TOL, "batch size 1 vs 16")


def test_loglikelihood_rolling_matches_hflm_on_documents_longer_than_the_context(ours, hflm):
    documents = ["The quick brown fox jumps over the lazy dog. " * 30, "héllo wörld — ünïcode 世界 " * 12, "short", ""]
    assert len(ours.tok_encode(documents[0])) > 4 * CONTEXT
    want = hflm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in documents]), disable_tqdm=True)
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in documents]), disable_tqdm=True)
    # HFLM's totals are fp32 sums (one ulp of -3300 is 2.4e-4); ours are summed in float64: allow HFLM's rounding
    for a, b in zip(got, want):
        assert abs(a - b) <= LL_TOL + 2 ** -23 * abs(b), f"loglikelihood_rolling vs HFLM: {a} vs {b}"


def test_generate_until_equals_hflm_greedy_text(ours, hflm):
    contexts = ["The cat", "Once upon a time there was", "héllo 世界", "1, 2, 3,", "Q: why?\nA:"]
    requests = [(c, {"until": ["\n", "."], "max_gen_toks": 12}) for c in contexts]
    requests += [(c, {"until": "zz", "max_gen_toks": 5, "do_sample": False}) for c in contexts[:2]]
    want = hflm.generate_until(instances("generate_until", requests), disable_tqdm=True)
    got = ours.generate_until(instances("generate_until", requests), disable_tqdm=True)
    assert got == want


def test_requests_longer_than_the_context_are_cut_from_the_left_as_hflm_and_counted(ckpt, hflm):
    lm = GPTNeoXLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=4)
    long = "word " * (2 * CONTEXT)
    requests = [(long, " end"), (long, " a much longer ending of several tokens"), ("short", " one")]
    want = hflm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    got = lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    assert_loglikelihoods_match(got, want, LL_TOL, "truncated loglikelihood vs HFLM")
    gen = [(long, {"until": ["\n"], "max_gen_toks": 6})]
    assert lm.generate_until(instances("generate_until", gen), disable_tqdm=True) == \
        hflm.generate_until(instances("generate_until", gen), disable_tqdm=True)
    assert lm.get_model_info()["truncated_requests"] == {"loglikelihood": 2, "generate_until": 1}


def test_adapter_matches_hflm_with_peft(ckpt, tmp_path):
    """model_args adapter= (ours, in PEFT's format) against HFLM's peft= on the same files."""
    from lm_eval.models.huggingface import HFLM
    from gptneox import GPTNeoX, LoRAConfig, add_lora, save_adapter
    model = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=("query", "value", "dense_h_to_4h")))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # B starts at zero: a fresh adapter would not change the numbers
                p.copy_(torch.randn_like(p) * 0.5)
    save_adapter(model, tmp_path / "adapter")
    requests = REQUESTS[:6]
    base = GPTNeoXLM(pretrained=ckpt, device="cpu", dtype="float32", batch_size=4)
    plain = base.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    lm = GPTNeoXLM(pretrained=ckpt, adapter=str(tmp_path / "adapter"), device="cpu", dtype="float32", batch_size=4)
    got = lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    hf = HFLM(pretrained=ckpt, peft=str(tmp_path / "adapter"), device="cpu", dtype="float32", batch_size=4)
    want = hf.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, plain)) > 1e-2, "the adapter changed nothing"
    assert_loglikelihoods_match(got, want, LL_TOL, "adapter vs HFLM peft=")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_arg_scores_with_the_quantized_model(ckpt, ours, shared_data, mode):
    """model_args quantize=: the checkpoint quantized while it loads scores as the same model quantized by hand."""
    from gptneox import GPTNeoX, Tokenizer, quantize
    requests = REQUESTS[:5]
    lm = GPTNeoXLM(pretrained=ckpt, quantize=mode, group_size=32, device="cpu", dtype="float32", batch_size=4)
    got = lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    model = quantize(GPTNeoX.from_pretrained(ckpt, dtype=torch.float32), mode, group_size=32)
    by_hand = GPTNeoXLM(pretrained=model, tokenizer=Tokenizer.from_pretrained(ckpt), device="cpu", batch_size=4)
    want = by_hand.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    assert_loglikelihoods_match(got, want, BATCH_TOL, f"{mode} while loading vs by hand")
    plain = ours.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, plain)) > 0, "quantize= changed nothing"
    assert lm.get_model_info()["model_num_parameters"] == lm.model.config.num_parameters


# ---------------------------------------------------------------------------------- what HFLM does not do
def test_logits_are_cut_to_the_real_vocabulary(shared_data, tmp_path):
    """Padding rows that would win every argmax: HFLM's numbers include them, ours are over the real tokens."""
    from transformers import GPTNeoXForCausalLM
    path = save_with_tokenizer(tiny_padded(1, 50.0), os.path.join(shared_data, "pythia-tokenizer.json"), tmp_path)
    lm = GPTNeoXLM(pretrained=path, device="cpu", dtype="float32")
    context, continuation = "The cat", " sat on the mat"
    (got, _), = lm.loglikelihood(instances("loglikelihood", [(context, continuation)]), disable_tqdm=True)
    ids = lm.tok_encode(context + continuation)
    n = len(ids) - len(lm.tok_encode(context))
    hf = GPTNeoXForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -n - 1:-1, :PYTHIA_TOKENS]  # [n, real vocab]
    want = logits.log_softmax(-1).gather(-1, torch.tensor(ids[-n:])[:, None]).sum().item()
    assert abs(got - want) <= LL_TOL * abs(want) + LL_TOL
    text, = lm.generate_until(instances("generate_until", [(context, {"until": [], "max_gen_toks": 4})]),
                              disable_tqdm=True)
    assert text, "greedy generation picked padding rows (which decode to nothing)"


def test_dolly_template_wraps_prompts_and_stops_at_end(shared_data, tmp_path):
    model = tiny_padded(2, -1000.0, vocab_size=50280, boost=[50277])  # always predicts "### End"
    path = save_with_tokenizer(model, os.path.join(shared_data, "dolly-tokenizer.json"), tmp_path)
    requests = instances("generate_until", [(c, {"until": ["\n\n"], "max_gen_toks": 5}) for c in ("Hi", "Why?")])
    plain = GPTNeoXLM(pretrained=path, device="cpu", dtype="float32", batch_size=2)
    assert plain.generate_until(requests, disable_tqdm=True) == ["", ""]  # "### End" is special: skipped, as HFLM
    assert plain.generator.tokens_generated == 2 * 5, "without the template, generation must not stop at ### End"
    dolly = GPTNeoXLM(pretrained=path, device="cpu", dtype="float32", batch_size=2, dolly_template=True)
    seen = []
    generate = dolly.generator.generate
    dolly.generator.generate = lambda prompts, config, **kw: seen.append((prompts, config)) or generate(prompts,
                                                                                                      config, **kw)
    assert dolly.generate_until(requests, disable_tqdm=True) == ["", ""]
    assert dolly.generator.tokens_generated == 2, "each row stops at its first ### End"
    prompts, config = seen[0]
    assert sorted(prompts) == sorted(dolly.tok_encode(format_prompt(c)) for c in ("Hi", "Why?"))
    assert END_KEY in config.stop_strings and 50277 in config.eos_token_id


# ------------------------------------------------------------------------------------------------ bad input
def test_model_args_unknown_keys_list_the_valid_ones(ckpt):
    with pytest.raises(ValueError, match="unknown model_args tempreature.*valid: pretrained, revision"):
        GPTNeoXLM(pretrained=ckpt, tempreature=1)
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        GPTNeoXLM(pretrained=ckpt, quantize="int3")
    with pytest.raises(ValueError, match="batch_size=auto"):
        GPTNeoXLM(pretrained=ckpt, batch_size="auto")
    with pytest.raises(ValueError, match="max_length=65 exceeds the model's context window of 64"):
        GPTNeoXLM(pretrained=ckpt, max_length=65)
    with pytest.raises(ValueError, match="pretrained is required"):
        GPTNeoXLM()


def test_capabilities_we_lack_are_named(ours):
    beams = instances("generate_until", [("Hi", {"until": ["\n"], "num_beams": 4})])
    with pytest.raises(ValueError, match="task.s. handmade ask for generation kwargs num_beams"):
        ours.generate_until(beams, disable_tqdm=True)
    with pytest.raises(ValueError, match="no chat template"):
        ours.chat_template(True)
    with pytest.raises(ValueError, match="empty continuation"):
        ours.loglikelihood(instances("loglikelihood", [("context", "")]), disable_tqdm=True)


def test_registered_as_gptneox_in_lm_evals_registry():
    from lm_eval.api.registry import get_model
    assert get_model("gptneox") is GPTNeoXLM


# -------------------------------------------------------------------------------------- the command line
TASKS = {
    "tiny_mc": ("multiple_choice", "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: label\n"
                "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "tiny_gen": ("generate_until", "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \"{{answer}}\"\n"
                 "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n"),
    "tiny_ppl": ("loglikelihood_rolling", "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                 "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
}


def write_tasks(path: Path) -> Path:
    """Three offline tasks over one JSON lines file: multiple choice, generation, perplexity."""
    docs = [dict(question=f"What follows {a} {b}?", choices=[f" {a + b}", f" {a * b}", " cat", " the sky"],
                 label=k % 4, answer=f" {a + b}", text=f"Numbers {a} and {b} make {a + b}. " * (1 + k % 5))
            for k, (a, b) in enumerate((a, b) for a in range(1, 5) for b in range(2, 5))]
    path.mkdir()
    data = path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, (kind, body) in TASKS.items():
        (path / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {data}\ntest_split: test\noutput_type: {kind}\n{body}")
    return path


@pytest.mark.slow  # lm-eval's whole command line twice in fresh processes: ~25 s
def test_cli_runs_an_offline_task_with_the_same_results_as_model_hf(ckpt, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    tasks = write_tasks(tmp_path / "tasks")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "datasets"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gptneox.eval", "--model_args", f"pretrained={ckpt},dtype=float32",
           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
           "--batch_size", "8", "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "datasets")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ckpt},dtype=float32", tasks=list(TASKS),
                                     device="cpu", batch_size=8, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric], metric
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["tiny_ppl"][metric], theirs["results"]["tiny_ppl"][metric]
        assert abs(a - b) <= 1e-5 * abs(b), f"{metric}: {a} vs {b}"
    generated = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_tiny_gen_*.jsonl")).open()]
    want = {s["doc_id"]: s["filtered_resps"] for s in theirs["samples"]["tiny_gen"]}
    assert {s["doc_id"]: s["filtered_resps"] for s in generated} == want
    assert ours["config"]["model"] == "gptneox" and ours["config"]["truncated_requests"] == {}


def test_cli_refuses_another_model(capsys):
    assert main(["--model", "hf", "--tasks", "x"]) == 2
    assert "this command evaluates --model gptneox" in capsys.readouterr().err


def test_cli_help_leads_with_gptneox_model_args_then_lm_evals_flags():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "gptneox.eval", "--help"], env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    ours = out.index("--model_args of gptneox")
    assert all(f"\n  {key} " in out[ours:] for key in MODEL_ARGS)  # every key, explained
    theirs = out.index("usage: lm-eval")  # lm-eval's help follows ours, whole
    assert ours < out.index("lm-eval's own flags follow") < theirs < out.index("--batch_size <size>")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_cli_device_this_machine_lacks_is_a_usage_error_in_one_line(ckpt, capsys):
    """The rule of every gptneox command (sample.py, train.py, the server): one line, exit 2, before any load."""
    assert main(["--model_args", f"pretrained={ckpt}", "--tasks", "x", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("gptneox.eval: error: --device cuda: CUDA is not available on this machine "
                                       "(try --device cpu)\n")
    assert main(["--model_args", f"pretrained={ckpt},device=cuda:0", "--tasks", "x"]) == 2
    assert "--model_args device=cuda:0: CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^device='cuda': CUDA is not available on this machine \(try device='cpu'\)$"):
        GPTNeoXLM(pretrained=ckpt, device="cuda")
