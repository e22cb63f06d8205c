"""train.py: one step equals HF transformers' loss and gradients, the Dolly run end to end (export that HF loads,
an overfit model answering through sample.py), kill-and-resume bit for bit, schedules, and every bad input."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny import hf_config, hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, FP32_LOSS_ABS, assert_grads_match_hf, assert_rel_close

from gptneox.cli import UsageError
from gptneox.config import PRESETS, Config
from gptneox.model import GPTNeoX, causal_lm_loss
from gptneox.prompts.dolly import INTRO_BLURB
from gptneox.tokenizer import Tokenizer
from gptneox.train import loop
from gptneox.train.config import RUN_KEYS, TrainConfig
from gptneox.train.data import IGNORE_INDEX, DataError, collate, count_targets
from gptneox.train.schedule import lr_at
from gptneox.train.state import RunError, check_out, load_state

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = dict(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256)
RECORDS = [dict(instruction="What color is the sky?", context="", response="The sky is blue."),
           dict(instruction="Name a fruit.", context="", response="An apple is a fruit."),
           dict(instruction="Where is Paris?", context="Paris is a city.", response="Paris is in France.")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps({**r, "category": "open_qa"}) + "\n" for r in records))
    return path


def small_tokenizer(path):
    """A ~380-entry byte-level BPE trained on the records (the 20B tokenizer's pipeline, a small vocabulary, so
    that a tiny model trains in milliseconds); train.py adds Dolly's three tokens (appended after it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.decoder = normalizers.NFC(), decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [INTRO_BLURB, "### Instruction:\n### Response:\nInput:\n### End"] + [" ".join(r.values()) for r in RECORDS]
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CPU is shared); subprocesses get OMP_NUM_THREADS=1 too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT-NeoX checkpoint (384 vocabulary rows) with a small tokenizer lacking the Dolly tokens."""
    path = tmp_path_factory.mktemp("ckpt")
    hf_model(0, **TINY).save_pretrained(path)
    small_tokenizer(path / "tokenizer.json")
    return path


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", RECORDS * 4)


def run(ckpt, data, out, **kw):
    args = dict(init=str(ckpt), data=str(data), out=str(out), max_steps=4, batch_size=4, micro_batch_size=2,
                lr=1e-3, warmup_steps=0, val_size=2, save_every=2, eval_every=2, sample_every=0, progress=False)
    train.main(**{**args, **kw})
    return Path(out)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


# --------------------------------------------------------------------------------------- parity with HF
def test_train_step_matches_hf_loss_and_grads():
    hf = hf_model(1)  # fp32, eager attention
    ours = GPTNeoX(Config.from_hf_config(hf.config.to_dict()))
    ours.load_state_dict(hf_state_dict(hf))
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (13, 9, 16, 5):  # right-padded rows; the first tokens of each are a masked prompt
        ids = torch.randint(2, 101, (n,), generator=g).tolist()
        examples.append((ids, [IGNORE_INDEX] * 3 + ids[3:]))
    input_ids, labels = collate(examples, pad_id=0)
    hf_loss = hf(input_ids, labels=labels).loss
    hf_loss.backward()
    # ours: the same batch as two accumulated micro-batches, normalised by the global target count
    run_ = SimpleNamespace(model=ours, world=1, pad_id=0, device=torch.device("cpu"), autocast=nullcontext())
    local, positions, _ = loop.train_step(run_, [examples[:2], examples[2:]], count_targets(examples))
    loss = torch.tensor(local / count_targets(examples))
    with torch.no_grad():  # accumulation and normalisation add nothing to the model's own loss error ...
        assert abs(loss - causal_lm_loss(ours(input_ids), labels)) <= FP32_LOSS_ABS
    # ... which vs HF is a few fp32 ulps (~1e-6 at loss 4.8): the table's fp32 model-vs-HF row, relative
    assert_rel_close(loss, hf_loss.detach(), FP32_LOGITS_REL, "loss")
    assert_grads_match_hf(ours, hf)


def test_grad_checkpointing_gives_identical_gradients():
    models = [GPTNeoX(Config.from_hf_config(hf_config().to_dict())) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].gradient_checkpointing = True
    ids = torch.randint(0, 101, (2, 24))
    for m in models:
        loop.loss_sum(m, ids, ids, nullcontext()).backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_resize_vocab_cuts_pythia_rows_to_dolly_and_grows_with_mean():
    model = GPTNeoX(Config.from_hf_config(hf_config(vocab_size=50304).to_dict()))
    head = model.embed_out.weight.detach().clone()
    model.resize_token_embeddings(50280)
    assert model.config.vocab_size == 50280 and model(torch.tensor([[50279]])).shape == (1, 1, 50280)
    assert torch.equal(model.embed_out.weight, head[:50280])
    model.resize_token_embeddings(50282)
    torch.testing.assert_close(model.gpt_neox.embed_in.weight[-1], model.gpt_neox.embed_in.weight[:50280].mean(0))


# -------------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_constant_is_deepspeed_log_warmup():
    lrs = [lr_at(s, lr=5e-6, warmup_steps=50, max_steps=1000) for s in (0, 1, 48, 49, 999)]
    assert lrs[0] == 0.0 and lrs[3] == lrs[4] == 5e-6  # DeepSpeed WarmupLR: log(s + 1) / log(50), from 0
    assert math.isclose(lrs[1], 5e-6 * math.log(2) / math.log(50)) and lrs[2] < 5e-6
    assert lr_at(0, lr=1.0, warmup_steps=0, max_steps=10) == 1.0


def test_lr_schedule_cosine_warms_up_linearly_then_decays_to_a_tenth():
    lr = [lr_at(s, lr=1.0, warmup_steps=10, max_steps=111, schedule="cosine") for s in range(111)]
    assert lr[0] == 0.1 and lr[9] == lr[10] == 1.0 and math.isclose(lr[110], 0.1) and math.isclose(lr[60], 0.55)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(0, lr=1.0, warmup_steps=0, max_steps=1, schedule="linear")


# ---------------------------------------------------------------------------------------------- end to end
def test_train_dolly_run_writes_hf_checkpoint_that_transformers_loads(ckpt, data, tmp_path):
    from transformers import GPTNeoXForCausalLM
    out = run(ckpt, data, tmp_path / "out")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in rows) and "val_loss" in rows[1]
    config = json.loads((out / "config.json").read_text())
    n = len(Tokenizer.from_pretrained(ckpt))
    assert config["vocab_size"] == n + 3  # resized to the tokenizer plus Dolly's 3 tokens (Pythia: 50280)
    tok = Tokenizer.from_pretrained(out)
    assert (tok.end_key_id, tok.instruction_key_id, tok.response_key_id) == (n, n + 1, n + 2)
    assert (out / "loss.png").stat().st_size > 0 or importlib.util.find_spec("matplotlib") is None
    ids = torch.tensor([[n + 1, 51, 300, n + 2, 77]])
    ours = GPTNeoX.from_pretrained(out)(ids)
    hf = GPTNeoXForCausalLM.from_pretrained(out).eval()(ids).logits
    assert_rel_close(ours, hf, FP32_LOGITS_REL, "logits of the exported model")
    final = load_state(out / "checkpoints" / "step-00000004.pt")["model"]
    assert torch.equal(final["embed_out.weight"], load_file(out / "model.safetensors")["embed_out.weight"])


@pytest.mark.skipif(not (ROOT / "sample.py").exists(), reason="sample.py not in this checkout")
def test_train_overfits_records_then_answers_through_sample_py(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = run(ckpt, data, tmp_path / "out", max_steps=60, batch_size=3, micro_batch_size=3, lr=1e-2,
              val_size=0, save_every=60, eval_every=0)
    assert metrics(out)[-1]["loss"] < 0.05
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(out), "--prompt",
                        RECORDS[0]["instruction"], "--temperature", "0", "--max_new_tokens", "16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert RECORDS[0]["response"] in r.stdout


def kill_resume_and_compare(ckpt, data, tmp_path, args: dict, kill_at: int, output: str) -> None:
    """Run train.py with args, SIGKILL it once kill_at steps are logged, --resume it, and check it against an
    uninterrupted run: every step's loss bit for bit, the output file (model or adapter) and Adam's second moments."""
    argv = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    killed_out = tmp_path / "killed"
    killed = cli(*argv, "--out", killed_out, start_new_session=True)
    while not ((killed_out / "metrics.jsonl").exists() and len(metrics(killed_out)) >= kill_at):
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)  # at kill_at or a little later, after the last saved state
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_out / output).exists()
    resumed = cli(*argv, "--out", killed_out, "--resume")
    train.main(**{**args, "init": str(ckpt), "data": str(data)}, out=str(tmp_path / "whole"), progress=False)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stdout
    steps = args["max_steps"]
    whole, again = metrics(tmp_path / "whole"), metrics(killed_out)
    assert [r["step"] for r in again] == list(range(1, steps + 1))
    assert again == [{**r, "tokens_per_s": m["tokens_per_s"]} for r, m in zip(whole, again)]  # losses bit for bit
    a, b = load_file(tmp_path / "whole" / output), load_file(killed_out / output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_state(p / "checkpoints" / f"step-{steps:08d}.pt")["optimizer"]["state"]
              for p in (tmp_path / "whole", killed_out))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


@pytest.mark.slow  # a killed process and a resumed one (CI runs the slow tier); in-process resume: the failed-save test
def test_train_resume_after_kill_is_bit_exact(ckpt, data, tmp_path):
    args = dict(init=ckpt, data=data, max_steps=40, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=3,
                val_size=2, save_every=4, eval_every=5, sample_every=0, seed=3)
    kill_resume_and_compare(ckpt, data, tmp_path, args, 14, "model.safetensors")  # the last state: step 12 (or 16)


def test_train_pretrains_on_packed_tokens_and_reduces_loss(tmp_path):
    import numpy as np
    (tmp_path / "config.json").write_text(json.dumps(Config(**{**TINY, "vocab_size": 64}).to_hf_config()))
    (np.arange(4096) % 61).astype(np.uint16).tofile(tmp_path / "tokens.bin")  # a learnable periodic sequence
    out = train.main(config=str(tmp_path / "config.json"), data=str(tmp_path / "tokens.bin"), out=str(tmp_path / "o"),
                     max_steps=15, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=2, schedule="cosine",
                     seq_len=32, save_every=100, eval_every=15, progress=False)
    assert out is None
    rows = metrics(tmp_path / "o")
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"] and rows[-1]["val_loss"] < 0.7 * rows[0]["loss"]
    assert rows[-1]["lr"] < rows[2]["lr"]  # cosine decay
    assert GPTNeoX.from_pretrained(tmp_path / "o").config.vocab_size == 64  # no Dolly resize for pretraining



def test_train_fine_tunes_a_checkpoint_without_a_tokenizer_on_token_data(tmp_path):
    """--init loads through gptneox.load; a checkpoint with no tokenizer.json still trains on token ids (none is
    needed), and the export has none either."""
    import numpy as np
    hf_model(0, **TINY).save_pretrained(tmp_path / "ckpt")
    (np.arange(2048) % 61).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    out = run(tmp_path / "ckpt", tmp_path / "tokens.bin", tmp_path / "o", seq_len=32, max_steps=2, save_every=0)
    assert len(metrics(out)) == 2 and (out / "model.safetensors").exists() and not (out / "tokenizer.json").exists()

# ------------------------------------------------------------------------------------------------ bad input
def test_train_refuses_out_that_holds_a_different_run(ckpt, data, tmp_path):
    out = run(ckpt, data, tmp_path / "out", max_steps=2)
    with pytest.raises(RunError, match=r"holds a different run \(lr: 0.001 there, 0.002 now"):
        run(ckpt, data, out, max_steps=2, lr=2e-3)
    with pytest.raises(RunError, match="add --resume"):
        run(ckpt, data, out, max_steps=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty and holds no run.json"):
        run(ckpt, data, tmp_path / "other")


@pytest.mark.parametrize("text, why", [("notes\n", "not a JSON object"), ('["init"]', "not a JSON object"),
                                       ('{"my": "notes"}', "no init, config, tokenizer and 14 more")])
def test_train_refuses_out_whose_run_json_is_not_a_train_run(text, why, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(text)
    with pytest.raises(RunError, match=f"--out {tmp_path / 'out'} holds a run.json that is not a train.py "
                                             f"run's \\({why}\\); choose an empty or new directory"):
        check_out(tmp_path / "out", {k: 1 for k in RUN_KEYS}, resume=False)
    assert (tmp_path / "out" / "run.json").read_text() == text


def test_train_refuses_out_whose_export_was_edited_before_the_run(ckpt, tmp_path):
    run, out = {k: 1 for k in RUN_KEYS}, tmp_path / "out"
    GPTNeoX.from_pretrained(ckpt).save_pretrained(out, tokenizer=Tokenizer.from_pretrained(ckpt))  # an export
    (out / "run.json").write_text(json.dumps(run))
    assert check_out(out, run, resume=False) is None  # as written: the export will replace it
    (out / "config.json").write_text('{"my": "notes"}')
    with pytest.raises(RunError, match=f"--out {out} holds config.json, not written by gptneox \\(or changed "
                                             "since\\): move it away"):
        check_out(out, run, resume=False)
    (out / "config.json").unlink()
    (out / "adapter_model.safetensors").write_bytes(b"a PEFT adapter")  # a LoRA run's export would replace it
    with pytest.raises(RunError, match="holds adapter_model.safetensors, not written by gptneox"):
        check_out(out, run, resume=False)


def test_train_export_never_overwrites_an_edited_export(ckpt, data, tmp_path):
    """Full fine-tuning: checked before the run; LoRA's --export-merged (OUT/merged): refused by the export itself."""
    out = run(ckpt, data, tmp_path / "full", max_steps=2)
    (out / "config.json").write_text('{"my": "notes"}')
    with pytest.raises(RunError, match="full holds config.json, not written by gptneox"):
        run(ckpt, data, out, max_steps=2, resume=True)
    assert (out / "config.json").read_text() == '{"my": "notes"}'
    lora = dict(max_steps=2, lora_r=4, lr=1e-2, export_merged=True)
    out = run(ckpt, data, tmp_path / "lora", **lora)
    (out / "merged" / "config.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="merged holds config.json, not written by gptneox"):
        run(ckpt, data, out, resume=True, **lora)
    assert (out / "merged" / "config.json").read_text() == '{"my": "notes"}'


def test_train_stops_on_nan_loss_naming_the_step_and_keeps_last_checkpoint(ckpt, data, tmp_path):
    with pytest.raises(RunError, match=r"step 2: loss nan .* not finite.*step-00000001.pt"):
        run(ckpt, data, tmp_path / "out", lr=1e30, save_every=1, grad_clip=0)  # step 1's update overflows step 2
    state = load_state(tmp_path / "out" / "checkpoints" / "step-00000001.pt")
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(metrics(tmp_path / "out")) == 1


def test_train_reports_data_with_nothing_left_after_filtering(ckpt, data, tmp_path):
    with pytest.raises(DataError, match=r"no record left to train on after filtering \(0 bad lines, 12 over-long\)"):
        run(ckpt, data, tmp_path / "out", seq_len=16)


def test_train_names_file_and_line_of_a_bad_record_or_skips_it(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 4)
    data.write_text(data.read_text() + "{broken\n")
    with pytest.raises(DataError, match=f"{data}:13: not a JSON object"):
        run(ckpt, data, tmp_path / "a")
    run(ckpt, data, tmp_path / "b", skip_bad_lines=True, max_steps=1)
    assert len(metrics(tmp_path / "b")) == 1


def test_train_cli_prints_clear_errors(ckpt, tmp_path, capsys):
    assert train.cli(["--init", str(ckpt), "--config", "pythia-14m", "--data", "x.jsonl", "--out", "o"]) == 2
    assert "exactly one of --init" in capsys.readouterr().err  # a usage error: exit 2, after the usage line
    help_text = train.build_parser().format_help()
    for flag in ("--init", "--config", "--data", "--out", "--epochs", "--max-steps", "--val-size", "--batch-size",
                 "--micro-batch-size", "--lr", "--warmup-steps", "--schedule", "--weight-decay", "--seq-len",
                 "--seed", "--save-every", "--eval-every", "--resume", "--device", "--dtype", "--compile",
                 "--grad-checkpointing", "--skip-bad-lines", "--threads"):
        assert flag in help_text
    assert "Fewer threads are often faster" in " ".join(help_text.split())
    args = TrainConfig(**vars(train.build_parser().parse_args(["--init", "x", "--data", "dolly-15k", "--out", "o"])))
    args, notes = args.resolve()
    assert (args.run_length[0], args.lr, args.warmup(620), args.schedule, args.weight_decay) == (2, 5e-6, 50,
                                                                                                  "constant", 0)
    assert notes == [], "fine-tuning defaults need no word"
    assert args.warmup(20) == 2, "a short run still reaches its lr: warmup at most a tenth of it"


def test_train_flags_are_generated_from_train_config_fields():
    """A flag for every TrainConfig field and a field for every flag (but --help), each with a help text, spelled
    --name-with-dashes (a switch that is on by default: --no-name), its default the field's."""
    actions = {a.dest: a for a in train.build_parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        a = actions[name]
        assert a.help and a.option_strings == [("--no-" if a.default is True else "--") + name.replace("_", "-")]
        if f.default is dataclasses.MISSING:
            assert a.required, name
        else:
            assert a.default == f.default and type(a.default) is type(f.default), name
    parsed = vars(train.build_parser().parse_args(["--data", "d.jsonl", "--out", "o"]))
    assert parsed == {**{k: f.default for k, f in fields.items()}, "data": "d.jsonl", "out": "o"}
    assert actions["progress"].option_strings == ["--no-progress"] and actions["threads"].metavar == "N"


def test_train_failed_save_keeps_previous_checkpoint_and_resumes(ckpt, data, tmp_path, monkeypatch):
    import errno
    real_save, calls = torch.save, []

    def fill_disk_on_second_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", fill_disk_on_second_save)
    with pytest.raises(OSError, match="step 2 .* previous checkpoint is untouched"):
        run(ckpt, data, tmp_path / "out", max_steps=3, save_every=1)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000001.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    run(ckpt, data, tmp_path / "out", max_steps=3, save_every=1, resume=True)
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3]


# ------------------------------------------------------------------------------------ as a user runs it
def test_train_cli_with_default_flags_draws_a_bar_samples_and_exports(ckpt, data, tmp_path):
    """`python train.py --init DIR --data dolly.jsonl --out OUT` and nothing else: progress bar on (tqdm is
    installed), evaluation and a sample at the last step, the export, the loss curve."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", str(ckpt), "--data", str(data),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step/s" in r.stderr or "s/step" in r.stderr, f"no progress bar drawn: {r.stderr[-2000:]}"
    assert "100%" in r.stderr
    steps = len(metrics(out))  # Dolly's defaults: 2 epochs of a global batch of 48, micro-batches of 6
    assert steps == 2 and f"step {steps}: loss" in r.stdout and f"step {steps} sample:" in r.stdout
    assert "48 (6 per forward), lr 5e-06 constant" in r.stdout
    sample = next(line for line in r.stdout.splitlines() if "sample:" in line)  # escaped, cut: one line
    assert len(sample) <= 250 and sample.count("'") >= 4, sample
    assert "warning: the default batch (Dolly's) of 48 is larger than the 11 training examples" in r.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoints" / "step-00000002.pt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"


def test_train_batch_size_alone_adapts_the_micro_batch(ckpt, data, tmp_path, capsys):
    run(ckpt, data, tmp_path / "a", batch_size=4, micro_batch_size=None, max_steps=1, progress=True)
    assert "steps of 4 (4 per forward)" in capsys.readouterr().out  # the largest divisor of 4 up to Dolly's 6
    run(ckpt, data, tmp_path / "b", batch_size=10, micro_batch_size=None, max_steps=1)
    assert "steps of 10 (5 per forward)" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--batch-size 4 must be a multiple of --micro-batch-size 3"):
        run(ckpt, data, tmp_path / "c", batch_size=4, micro_batch_size=3)  # two values given: they contradict
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--micro-batch-size", "0"], "--micro-batch-size: must be positive"),
    (["--save-every", "-1"], "--save-every: must be >= 0"),
    (["--max-steps", "0"], "--max-steps: must be positive"),
    (["--max-steps", "-2"], "--max-steps: must be positive"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["--epochs", "3", "--max-steps", "5"], "give --epochs or --max-steps, not both"),
    (["--seq-len", "1"], "--seq-len must be an integer >= 2"),
    (["--dtype", "fp16"], "invalid dtype 'fp16'"),
])
def test_train_cli_refuses_bad_values_before_any_work_or_write(tmp_path, argv, message, capsys):
    assert_refused_before_any_work(tmp_path, argv, message, capsys)


def assert_refused_before_any_work(tmp_path, argv, message, capsys):
    """A usage error (exit 2, usage line, message) checked before the model is read: --init names nothing, yet the
    error is about the value; nothing is written."""
    out = tmp_path / "out"
    status = train.cli(["--init", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "d.jsonl"), "--out",
                        str(out), *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("usage: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_train_save_every_zero_saves_only_the_final_state(ckpt, data, tmp_path):
    out = run(ckpt, data, tmp_path / "out", save_every=0, max_steps=3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003.pt"]


def test_train_run_that_failed_before_its_first_step_does_not_block_the_corrected_rerun(ckpt, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", RECORDS * 4)
    bad.write_text(bad.read_text() + "{broken\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="bad.jsonl:13"):
        run(ckpt, bad, out)
    assert not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS * 4)
    run(ckpt, good, out, max_steps=1, save_every=0, eval_every=0)  # a different --data: accepted
    assert len(metrics(out)) == 1


def test_train_cli_runtime_error_is_one_line_with_status_1(ckpt, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    data.write_text(data.read_text() + "not json\n")
    status = train.cli(["--init", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--max_steps", "1",
                        "--no-progress"])  # --max_steps: the underscore spelling is an alias
    err = capsys.readouterr().err
    assert status == 1
    assert err.strip().splitlines()[-1] == f"train.py: error: {data}:4: not a JSON object (Expecting value at " \
                                           "column 1)" and "Traceback" not in err


# --------------------------------------------------------------------------- paths, devices: checked before loading
def assert_refused_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    """A usage error (exit 2, the usage line, one message) raised before the model would load; nothing is written."""
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    before = sorted(tmp_path.rglob("*"))
    status = train.cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("usage: ") and err.strip().splitlines()[-1] == f"train.py: error: {message}"
    assert sorted(tmp_path.rglob("*")) == before


PATH_CASES = {  # flags over `--init CKPT --data DATA --out TMP/out`; TMP stands for the test's directory
    "data missing": (dict(data="TMP/nope.jsonl"), "--data TMP/nope.jsonl: no such file"),
    "data a directory": (dict(data="TMP/dir.jsonl"), "--data TMP/dir.jsonl: a directory, not a file"),
    "data a format train cannot read": (dict(data="TMP/d.csv"), "--data TMP/d.csv: train.py reads 'dolly-15k', "
                                        "instruction records (.jsonl, .json) or pretraining text or tokens (.txt, or "
                                        "uint16 ids in .bin / .npy)"),
    "out a file": (dict(out="TMP/file"), "--out TMP/file: a file, not a directory"),
    "out under a file": (dict(out="TMP/file/run"), "--out TMP/file/run: TMP/file is a file, not a directory"),
    "init a path that does not exist": (dict(init="./no-such-model"), "--init ./no-such-model: no such directory"),
    "init neither a directory nor a name": (dict(init="TMP/no/such/model"), "--init 'TMP/no/such/model' is neither an "
                                            "existing directory nor a model name like 'dolly-v2-12b', "
                                            "'EleutherAI/pythia-1.4b' or 'pythia-160m@step3000'"),
    "init a file": (dict(init="TMP/file"), "--init TMP/file: a file; a checkpoint is a directory holding config.json "
                    "and the weights"),
    "init a directory without config.json": (dict(init="TMP/dir.jsonl"), "--init TMP/dir.jsonl: no config.json "
                                             "there; a checkpoint is a directory holding config.json and the weights"),
    "tokenizer missing": (dict(tokenizer="TMP/tok.json"), "--tokenizer TMP/tok.json: no such file"),
    "config.json missing": (dict(init=None, config="TMP/c.json"), "--config TMP/c.json: no such file"),
    "config not a preset": (dict(init=None, config="pythia-7m"), "--config pythia-7m: neither a config.json nor a "
                            f"preset; presets: {', '.join(PRESETS)}"),
    "instruction data without a tokenizer": (dict(init=None, config="pythia-14m"), "--data DATA: instruction data "
                                             "needs a tokenizer; add --tokenizer (a --config model has none)"),
    "sample-every on pretraining data": (dict(data="TMP/t.bin", sample_every=5), "--sample-every answers an "
                                         "instruction, so it needs instruction data (dolly-15k, .jsonl, .json); --data "
                                         "TMP/t.bin is pretraining data"),
    "resume where nothing was saved": (dict(resume=True), "--resume: --out TMP/out does not exist, so there is "
                                       "nothing to resume; without --resume the run starts from step 0"),
    "resume in an empty directory": (dict(resume=True, out="TMP/dir.jsonl"), "--resume: --out TMP/dir.jsonl holds "
                                     "no saved training state, so there is nothing to resume; without --resume the "
                                     "run starts from step 0"),
}


@pytest.mark.parametrize("case", PATH_CASES)
def test_train_cli_checks_every_path_before_loading(ckpt, data, tmp_path, monkeypatch, capsys, case):
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "file").write_text("not a directory")
    flags, message = PATH_CASES[case]
    flags = {"init": ckpt, "data": data, "out": "TMP/out", **flags}
    argv = [x for k, v in flags.items() if v is not None
            for x in ((flag(k),) if v is True else (flag(k), str(v).replace("TMP", str(tmp_path))))]
    message = message.replace("TMP", str(tmp_path)).replace("DATA", str(data))
    assert_refused_before_loading(tmp_path, monkeypatch, capsys, argv, message)


def flag(name):
    return "--" + name.replace("_", "-")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_cli_refuses_a_device_this_machine_lacks_in_one_line(ckpt, data, tmp_path, monkeypatch, capsys):
    assert_refused_before_loading(tmp_path, monkeypatch, capsys, ["--init", ckpt, "--data", data, "--out",
                                                                  tmp_path / "out", "--device", "cuda"],
                                  "--device cuda: CUDA is not available on this machine (try --device cpu)")


def test_train_cli_typos_in_paths_are_one_line_before_the_model_loads_from_any_directory(ckpt, data, tmp_path):
    """The issue's commands as a user types them, from another directory: a typo in --data, --device cuda on a
    machine without CUDA; one line each, exit 2, no traceback, nothing written."""
    cases = [(["--data", "nope.jsonl"], "train.py: error: --data nope.jsonl: no such file")]
    if not torch.cuda.is_available():
        cases.append((["--data", data.name, "--device", "cuda"],
                      "train.py: error: --device cuda: CUDA is not available on this machine (try --device cpu)"))
    for argv, line in cases:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", str(ckpt), "--out", "out", *argv],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ defaults that adapt
def test_train_pretraining_defaults_are_pythias_for_the_nearest_size():
    def resolved(**kw):
        return TrainConfig(data="t.bin", out="o", **kw).resolve()[0]
    expected = {"pythia-70m": 1e-3, "pythia-160m-deduped": 6e-4, "pythia-410m": 3e-4, "pythia-1b": 3e-4,
                "pythia-1.4b": 2e-4, "pythia-2.8b": 1.6e-4, "pythia-6.9b": 1.2e-4, "pythia-12b": 1.2e-4,
                "pythia-14m": 1e-3, "pythia-31m": 1e-3, "dolly-v2-3b": 1.6e-4}  # the last three: the nearest size's
    for name, lr in expected.items():
        cfg = resolved(config=name)
        assert (cfg.lr, cfg.schedule, cfg.warmup(143000), cfg.warmup(2000)) == (lr, "cosine", 1430, 200), name
    assert resolved(config="pythia-70m", lr=3e-3, schedule="constant").lr == 3e-3  # a value given is kept
    assert resolved(config="pythia-70m", lora_r=8).lr == 2e-4
    tuned = resolved(init="x")
    assert (tuned.lr, tuned.schedule, tuned.warmup(2000)) == (5e-6, "constant", 50)  # fine-tuning: Dolly's


def test_train_pretraining_run_says_its_defaults_and_a_resumed_run_keeps_its_recorded_lr(tmp_path, capsys):
    import numpy as np
    (tmp_path / "config.json").write_text(json.dumps(Config(**{**TINY, "vocab_size": 64}).to_hf_config()))
    (np.arange(2048) % 61).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    args = dict(config=str(tmp_path / "config.json"), data=str(tmp_path / "tokens.bin"), out=str(tmp_path / "o"),
                max_steps=4, batch_size=4, seq_len=32, save_every=2, eval_every=0, progress=False)
    train.main(**args)
    cosine = [lr_at(s, lr=1e-3, warmup_steps=0, max_steps=4, schedule="cosine") for s in range(4)]
    assert [r["lr"] for r in metrics(tmp_path / "o")] == cosine  # pythia-70m's lr, no warmup in a 4-step run
    out = capsys.readouterr().out
    assert "pretraining defaults: Pythia's for pythia-70m, the nearest size to this model's 0.0212M parameters" in out
    assert "lr 0.001 cosine after 0 warmup" in out
    # a run started when pretraining took Dolly's lr (run.json says so), killed after step 2, resumed: its lr stays
    run_json = tmp_path / "o" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "lr": 5e-6, "schedule": "constant"}))
    (tmp_path / "o" / "checkpoints" / "step-00000004.pt").unlink()
    train.main(**args, resume=True)
    assert [r["lr"] for r in metrics(tmp_path / "o")][2:] == [5e-6, 5e-6]
    out = capsys.readouterr().out
    assert "--resume: lr 5e-06 as run.json recorded it (the default is now 0.001)" in out
    assert "--resume: schedule constant as run.json recorded it (the default is now cosine)" in out
    assert json.loads(run_json.read_text())["lr"] == 5e-6


def test_train_says_when_the_batch_is_larger_than_the_data_or_an_epoch_shorter_than_the_warmup(ckpt, data, tmp_path,
                                                                                             capsys):
    run(ckpt, data, tmp_path / "a", batch_size=None, micro_batch_size=None, max_steps=1)  # 10 examples after val 2
    err = capsys.readouterr().err
    assert err.strip() == ("warning: the default batch (Dolly's) of 48 is larger than the 10 training examples: every "
                           "step sees each of them 4.8 times on average, at 4.8x the compute of --batch-size 10")
    run(ckpt, data, tmp_path / "b", warmup_steps=5, max_steps=1)  # batch 4: an epoch of 10 examples is 3 steps
    assert capsys.readouterr().err.strip() == ("warning: an epoch is 3 steps, shorter than the 5 warmup steps: the "
                                               "learning rate reaches its peak 0.001 only after 1.7 epochs")
    run(ckpt, data, tmp_path / "c", max_steps=1)
    assert capsys.readouterr().err == ""


def test_train_samples_instruction_data_only_and_logs_a_sample_on_one_line(ckpt, tmp_path, capsys):
    from gptneox import progress
    from gptneox.train.data import add_dolly_tokens
    text = progress.one_line("line\n" * 100)
    assert "\n" not in text and len(text) == 160 and text.startswith("'line\\nline") and text.endswith("...")
    add_dolly_tokens(Tokenizer.from_pretrained(ckpt)).save(tmp_path / "dolly-tokenizer.json")
    (tmp_path / "t.txt").write_text(" ".join(r["response"] for r in RECORDS) * 20)
    run(ckpt, tmp_path / "t.txt", tmp_path / "out", tokenizer=str(tmp_path / "dolly-tokenizer.json"), seq_len=16,
        sample_every=None, eval_every=1, max_steps=2)  # a Dolly tokenizer, but pretraining text: no sample
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "sample:" not in out


def test_train_threads_flag_sets_torchs_threads(ckpt, data, tmp_path):
    run(ckpt, data, tmp_path / "out", threads=3, max_steps=1)
    assert torch.get_num_threads() == 3  # the one_thread fixture puts it back


# ---------------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow  # a real SIGINT to a training process; the message itself: test_train_stop_message_* below
def test_train_ctrl_c_says_where_it_stopped_and_the_command_that_resumes(ckpt, data, tmp_path):
    """SIGINT to train.py mid-run (started from another directory, default progress bar): exit 130, one line with
    the step, the last saved state and the exact command plus --resume, which then finishes the run."""
    argv = [sys.executable, str(ROOT / "train.py"), "--init", str(ckpt), "--data", data.name, "--out", "out",
            "--max-steps", "40", "--batch-size", "4", "--val-size", "2", "--save-every", "4", "--eval-every", "0"]
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not ((tmp_path / "out" / "metrics.jsonl").exists() and len(metrics(tmp_path / "out")) >= 6):
        assert p.poll() is None, p.communicate()
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"stopped at step (\d+) \(last state saved at step (\d+)\); resume with: (.+)", last)
    assert m, stderr[-2000:]
    step, saved, command = int(m[1]), int(m[2]), m[3]
    assert 6 <= step < 40 and saved % 4 == 0 and step - 4 <= saved <= step and "Traceback" not in stderr
    assert shlex.split(command) == argv + ["--resume"]
    r = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {saved}" in r.stdout and [x["step"] for x in metrics(tmp_path / "out")] == list(range(1, 41))


def test_train_stop_message_under_torchrun_and_before_any_save(tmp_path, monkeypatch):
    from gptneox.train.state import stop_message
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "my data.jsonl", "--resume"])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "train.py", "--data", "my data.jsonl", "--resume"])
    assert stop_message(tmp_path, 3) == ("stopped at step 3, before any state was saved; start again with: python3 "
                                         "train.py --data 'my data.jsonl'")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    assert stop_message(tmp_path, 3) == (
        "stopped at step 3 (last state saved at step 2); resume with: torchrun --nproc_per_node=2 train.py --data "
        "'my data.jsonl' --resume (under torchrun: with your other torchrun options, on any number of processes)")
    assert stop_message(tmp_path, 0).startswith("stopped at step 2 (")  # stopped while a resumed run loaded


# ------------------------------------------------------------------------------------------------------ demo
def test_dolly_tiny_demo_runs_again_on_the_model_it_trained(tmp_path, monkeypatch):
    """examples/dolly_tiny/demo.py twice: the second run asks the model the first one trained instead of failing
    with "already holds this run". train.py runs in this process (the whole demo, in subprocesses, is the slow
    test_sample.py::test_offline_demo_trains_and_answers); sample.py's command is recorded."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "dolly_tiny" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ran = []

    def run(cmd):
        ran.append(Path(cmd[1]).name)
        if cmd[1] == "train.py":
            assert train.cli([*cmd[2:], "--no-progress"]) == 0
    monkeypatch.setattr(demo, "run", run)
    for _ in range(2):
        demo.main(out=tmp_path / "dolly-tiny", steps=1, prompt="What is the capital of France?", context=None)
    assert ran == ["train.py", "sample.py", "sample.py"]
