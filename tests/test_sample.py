"""sample.py end to end on tiny checkpoints with the real Pythia / Dolly tokenizers: streamed output, batches,
templates, the report on stderr, bad input, interactive mode and Ctrl-C."""

import importlib.util
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import hf_model, save_checkpoint

from gptneox import GPTNeoX, Tokenizer
from gptneox.prompts.dolly import format_prompt
from gptneox.generation.generator import generate
from gptneox.generation.run import stop_ids
from gptneox.generation.streaming import completion_text

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample", ROOT / "sample.py")
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny random checkpoints with the Dolly (.bin, as Dolly ships) and Pythia (safetensors) tokenizers."""
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"shared test data not found at {shared}")
    root = tmp_path_factory.mktemp("ckpts")
    dolly = save_checkpoint(hf_model(0, vocab_size=50280, max_position_embeddings=256), root / "dolly", "bin")
    shutil.copy(shared / "dolly-tokenizer.json", dolly / "tokenizer.json")
    pythia = save_checkpoint(hf_model(1, vocab_size=50304, max_position_embeddings=256), root / "pythia",
                             "safetensors")
    shutil.copy(shared / "pythia-tokenizer.json", pythia / "tokenizer.json")
    return dolly, pythia


def expected(ckpt, prompts, max_new_tokens, dolly=True):
    """What sample.py must print for greedy generation: computed here with the library."""
    model, tok = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32), Tokenizer.from_pretrained(ckpt)
    ids = [tok.encode(format_prompt(p) if dolly else p) for p in prompts]
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0, tokenizer=tok)
    return [completion_text(tok, row, stop_ids(model, tokenizer=tok)) for row in out]


def run_cli(*args, input=None):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], input=input, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_sample_cli_dolly_streams_the_answer_and_reports(ckpts):
    dolly, _ = ckpts
    r = run_cli("--ckpt", str(dolly), "--prompt", "What is the capital of France?", "--temperature", "0",
                "--max-new-tokens", "12", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(dolly, ["What is the capital of France?"], 12)[0].strip() + "\n"
    for field in ("load", "tokens/s", "GB/s", "peak memory"):
        assert field in r.stderr, r.stderr


def test_sample_reads_stdin_with_the_plain_template(ckpts, capsys, monkeypatch):
    _, pythia = ckpts
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello, I am"))
    assert sample.main(ckpt=str(pythia), temperature=0, max_new_tokens=10) == 0
    assert capsys.readouterr().out == expected(pythia, ["Hello, I am"], 10, dolly=False)[0] + "\n"


def test_sample_stdin_trailing_newline_keeps_dolly_template_exact(ckpts, capsys, monkeypatch):
    dolly, _ = ckpts
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))  # as `echo ... |` sends it
    assert sample.main(ckpt=str(dolly), temperature=0, max_new_tokens=8) == 0
    assert capsys.readouterr().out == expected(dolly, ["What is the capital of France?"], 8)[0].strip() + "\n"


def test_sample_free_memory_counts_reclaimable_page_cache():
    free = sample.free_bytes(torch.device("cpu"))
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(free - available) < 0.02 * available  # MemAvailable (moments apart), not the smaller MemFree


def test_sample_prompt_file_runs_as_one_batch(ckpts, tmp_path, capsys):
    dolly, _ = ckpts
    prompts = ["Name a primary color.", "Write a haiku about the sea, with a long title first.", "Why?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    sample.main(ckpt=str(dolly), prompt_file=str(tmp_path / "prompts.txt"), temperature=0, max_new_tokens=8)
    out = capsys.readouterr().out
    singles = [expected(dolly, [p], 8)[0].strip() for p in prompts]  # each prompt alone: padding changes nothing
    assert out == "".join(f"--- sample {i + 1} of 3 ---\n{s}\n" for i, s in enumerate(singles))


def test_sample_num_samples_with_seed_is_reproducible(ckpts, capsys):
    _, pythia = ckpts
    kw = dict(ckpt=str(pythia), prompt="The sea", num_samples=3, seed=5, temperature=1.5, max_new_tokens=8)
    sample.main(**kw)
    first = capsys.readouterr().out
    sample.main(**kw)
    assert capsys.readouterr().out == first
    assert first.count("--- sample") == 3 and len(set(first.split("---")[2::2])) > 1, "samples should differ"


@pytest.mark.parametrize("kw, message", [
    (dict(prompt="word " * 300), r"prompt 1 is \d+ tokens with the Dolly template; the model's context window is "
                                 r"256 tokens"),
    (dict(prompt="  "), "the prompt is empty"),
    (dict(prompt="hi", temperature=-1.0), "temperature must be"),
    (dict(prompt="hi", top_p=2.0), "top_p must be"),
    (dict(prompt="hi", num_samples=0), "--num-samples"),
    (dict(prompt="hi", template="none", context="x"), "--context"),
    (dict(prompt="hi", prompt_file="x.txt"), "not both"),
])
def test_sample_rejects_bad_input_clearly(ckpts, kw, message):
    with pytest.raises(sample.UsageError, match=message):
        sample.main(ckpt=str(ckpts[0]), **kw)


def test_sample_rejects_unknown_names_and_missing_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(sample.UsageError, match="known model name"):
        sample.main(ckpt="dolly-v9", prompt="hi")
    monkeypatch.setattr("gptneox.hub.download", lambda *a: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(sample.UsageError, match="hf download databricks/dolly-v2-12b"):
        sample.main(ckpt="dolly-v2-12b", prompt="hi")


def test_sample_clips_max_new_tokens_to_the_window(ckpts, capsys):
    sample.main(ckpt=str(ckpts[1]), prompt="word" + " word" * 249, max_new_tokens=50, temperature=0)
    err = capsys.readouterr().err
    assert "--max-new-tokens 50 clipped to 6: the longest prompt is 250 tokens and the context window 256" in err


def test_sample_refuses_a_model_that_does_not_fit(ckpts, monkeypatch):
    monkeypatch.setattr(sample, "free_bytes", lambda device: 10_000)
    with pytest.raises(sample.UsageError, match=r"needs 0\.\d GB for its weights in float32 plus .* has 0\.0 GB free"):
        sample.main(ckpt=str(ckpts[0]), prompt="hi")


def test_sample_interactive_answers_each_line_and_exits_on_eof(ckpts, capsys, monkeypatch):
    dolly, _ = ckpts
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\n\nName a tree.\n"))
    assert sample.main(ckpt=str(dolly), interactive=True, temperature=0, max_new_tokens=6) == 0
    answers = expected(dolly, ["Name a fruit.", "Name a tree."], 6)
    assert capsys.readouterr().out == "".join(a.strip() + "\n" for a in answers)


@pytest.mark.slow  # a real SIGINT to a sample.py process
def test_sample_interactive_exits_cleanly_on_ctrl_c(ckpts):
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpts[0]), "--interactive"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    err, deadline = b"", time.time() + 90
    while b"> " not in err and time.time() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            err += os.read(proc.stderr.fileno(), 4096)
    assert b"> " in err, f"no input prompt shown: {err.decode()}"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=30) == 0
    err += proc.stderr.read()
    assert b"Traceback" not in err, err.decode()


@pytest.mark.slow
def test_offline_demo_trains_and_answers(tmp_path):
    """README's offline command: tokenizer, train.py and sample.py on the shipped instruction set (minutes)."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dolly_tiny" / "demo.py"), "--out",
                        str(tmp_path / "dolly-tiny")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "The capital of France is Paris.\n" in r.stdout, r.stdout[-2000:]


# ------------------------------------------------------------------------------------ as a user runs it
def test_sample_cli_with_default_flags_draws_the_loading_bar_and_reports(ckpts):
    """`python sample.py --ckpt DIR --prompt ...` and nothing else: Dolly's sampling defaults, clipped to the tiny
    model's window, the loading bar on stderr (tqdm is installed), the answer on stdout, the report last."""
    dolly, _ = ckpts
    r = run_cli("--ckpt", str(dolly), "--prompt", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "loading" in r.stderr and "tensor" in r.stderr, f"no loading bar: {r.stderr}"
    assert "clipped to" in r.stderr and "tokens/s" in r.stderr.splitlines()[-1]
    assert "(pytorch_model.bin)" in r.stderr.splitlines()[-1]  # the report names the weights it read
    assert r.stdout.endswith("\n")


def cli_status(capsys, *argv):
    """sample.py's command line run in this process: (exit status, stderr)."""
    status = sample.cli.run(sample.main, sample.build_parser(), list(argv))
    return status, capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors: corrupt or truncated safetensors file"),
    ("contradict", "has shape [50304, 64], but config.json implies [50304, 128]"),
    ("no-weights", "no model.safetensors, pytorch_model.bin or shard index"),
])
def test_sample_broken_checkpoint_is_one_line_with_status_1(ckpts, tmp_path, capsys, damage, message):
    ckpt = Path(shutil.copytree(ckpts[1], tmp_path / "ckpt"))
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "contradict":
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "intermediate_size": 512}))
    else:
        weights.unlink()
    status, err = cli_status(capsys, "--ckpt", str(ckpt), "--prompt", "Hi", "--no-progress")
    assert status == 1 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("sample.py: error: ") and message in line, line


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "argument --device: invalid device 'foo'"),
    (["--stop", ""], "stop_strings must be non-empty strings"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be positive"),
    (["--dtype", "half"], "invalid dtype 'half'"),
    (["--dtype", "int8"], "int8 is a weight format, not a dtype: use --quantize int8"),
    (["--activations", "int8"], "--activations int8 quantizes a quantized model's activations: give --quantize"),
    *([(["--device", "cuda"], "--device cuda: CUDA is not available on this machine (try --device cpu)")]
      if not torch.cuda.is_available() else []),
])
def test_sample_usage_errors_exit_2_with_the_usage_line(ckpts, capsys, argv, message):
    status, err = cli_status(capsys, "--ckpt", str(ckpts[1]), "--prompt", "Hi", *argv)
    assert status == 2 and err.startswith("usage: sample.py") and message in err, err


def test_sample_underscore_flags_are_aliases(ckpts, capsys):
    status, err = cli_status(capsys, "--ckpt", str(ckpts[1]), "--prompt", "Hi", "--max_new_tokens", "3",
                             "--temperature", "0", "--no_progress")
    assert status == 0, err
    assert "| 3 tokens in" in err


def test_sample_prefers_safetensors_beside_a_bin_and_says_so(ckpts, tmp_path, capsys):
    """Hub repositories often hold both: like transformers, read model.safetensors; the report names it."""
    ckpt = Path(shutil.copytree(ckpts[1], tmp_path / "both"))
    torch.save({"garbage": torch.zeros(1)}, ckpt / "pytorch_model.bin")  # would fail if it were read
    status, err = cli_status(capsys, "--ckpt", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "2", "--no-progress")
    assert status == 0, err
    assert "(model.safetensors)" in err.splitlines()[-1]


def test_sample_draft_gives_the_same_greedy_text_and_reports_acceptance(ckpts, tmp_path, capsys):
    _, pythia = ckpts
    draft = save_checkpoint(hf_model(7, vocab_size=50304, max_position_embeddings=256, num_hidden_layers=1),
                            tmp_path / "draft", "safetensors")
    shutil.copy(pythia / "tokenizer.json", draft / "tokenizer.json")
    sample.main(ckpt=str(pythia), prompt="Hello, I am", temperature=0, max_new_tokens=12)
    plain = capsys.readouterr().out
    sample.main(ckpt=str(pythia), prompt="Hello, I am", temperature=0, max_new_tokens=12, draft=str(draft),
                draft_tokens=3)
    out = capsys.readouterr()
    assert out.out == plain
    assert "speculative:" in out.err and "drafts accepted" in out.err and "tokens per target forward" in out.err


def test_sample_refuses_a_draft_with_another_tokenizer(ckpts):
    dolly, pythia = ckpts
    with pytest.raises(sample.UsageError, match="its tokenizer .* differs from the target's"):
        sample.main(ckpt=str(pythia), prompt="Hi", draft=str(dolly))
    with pytest.raises(sample.UsageError, match="--compile does not work with --draft"):
        sample.main(ckpt=str(pythia), prompt="Hi", draft=str(pythia), compile=True)


def test_sample_threads_flag_sets_torchs_cpu_threads(ckpts, capsys):
    before = torch.get_num_threads()
    try:
        status, err = cli_status(capsys, "--ckpt", str(ckpts[1]), "--prompt", "Hi", "--max-new-tokens", "2",
                                 "--threads", "1", "--no-progress")
        assert status == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "--threads N" in sample.build_parser().format_help() and "try 1" in sample.build_parser().format_help()
    assert cli_status(capsys, "--ckpt", str(ckpts[1]), "--prompt", "Hi", "--threads", "0")[0] == 2


def test_sample_report_names_the_adapter_it_applied(ckpts, tmp_path, capsys):
    from gptneox import LoRAConfig, add_lora, save_adapter
    model = GPTNeoX.from_pretrained(ckpts[1])
    add_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, targets="query,value"))
    save_adapter(model, tmp_path / "adapter")
    status, err = cli_status(capsys, "--ckpt", str(ckpts[1]), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hi",
                             "--max-new-tokens", "2", "--quantize", "int8", "--no-progress")
    assert status == 0, err
    report = err.strip().splitlines()[-1]
    assert f"(model.safetensors + LoRA adapter {tmp_path / 'adapter'})" in report and "weights int8:" in report


def test_sample_activations_int8_runs_the_a8_kernels_on_a_quantized_model(ckpts, capsys, monkeypatch):
    from gptneox.quant import transform
    chosen = []
    real = transform.quantize_activations
    monkeypatch.setattr(sample, "quantize_activations", lambda m, a: chosen.append(a) or real(m, a))
    status, err = cli_status(capsys, "--ckpt", str(ckpts[1]), "--prompt", "Hi", "--max-new-tokens", "3",
                             "--quantize", "int4", "--group-size", "32", "--activations", "int8", "--no-progress")
    assert status == 0, err
    assert chosen == ["int8"] and "| 3 tokens in" in err
