"""train.py --lora-r: the tiny Dolly run lowers the loss with the base bit for bit unchanged, writes a PEFT adapter
(and with --export-merged a merged model transformers loads) that sample.py --adapter applies; kill and --resume
bit for bit; FSDP with a frozen base; the LoRA flags' bad values."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import test_train
import torch
from safetensors.torch import load_file
from test_fsdp import finish, one_process, torchrun
from test_train import (RECORDS, ROOT, assert_refused_before_any_work, kill_resume_and_compare, metrics, run,
                        write_jsonl)
from tolerances import FP32_LOGITS_REL, assert_rel_close

from gptneox.lora.layers import base_state_dict, lora_modules, lora_state_dict
from gptneox.model import GPTNeoX
from gptneox.train import loop
from gptneox.train.config import TrainConfig
from gptneox.train.state import RunError, load_state

ckpt, data, one_thread = test_train.ckpt, test_train.data, test_train.one_thread  # fixtures, used by name
LORA = dict(lora_r=8, lr=1e-2)


def test_train_lora_lowers_the_loss_and_leaves_the_base_bit_for_bit(ckpt, data, tmp_path):
    args = dict(init=str(ckpt), data=str(data), out=str(tmp_path / "out"), max_steps=6, batch_size=4,
                micro_batch_size=2, warmup_steps=0, val_size=2, save_every=3, eval_every=3, sample_every=0,
                progress=False, **LORA)
    run_, resume_file = loop.setup(TrainConfig(**args))
    loop.prepare(run_, resume_file)
    base = {k: v.clone() for k, v in base_state_dict(run_.model).items()}
    stored = load_file(ckpt / "model.safetensors")
    for k, v in base.items():  # the base is --init's (the two embedding matrices resized to the Dolly tokens)
        hf = stored["embed_out.weight" if k == "embed_out.weight" and k not in stored else k]
        assert torch.equal(v, hf) if v.shape == hf.shape else torch.equal(v[:hf.shape[0]], hf[:v.shape[0]]), k
    trainable = {n for n, p in run_.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(run_.model)) and len(lora_modules(run_.model)) == 2
    loop.train_loop(run_)
    loop.export_run(run_)
    after = base_state_dict(run_.model)
    assert all(torch.equal(after[k], v) for k, v in base.items()), "a frozen base weight changed"
    rows = metrics(tmp_path / "out")
    assert len(rows) == 6 and rows[-1]["loss"] < 0.95 * rows[0]["loss"] and rows[5]["val_loss"] < rows[2]["val_loss"]
    out = Path(args["out"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json"} <= {
        p.name for p in out.iterdir()} and not (out / "model.safetensors").exists()
    state = load_state(out / "checkpoints" / "step-00000006.pt")  # the adapters only, not the frozen base
    assert set(state["model"]) == set(lora_state_dict(run_.model))
    loaded = GPTNeoX.from_pretrained(ckpt, adapter=out)  # resized to the adapter's 3 extra Dolly tokens
    run_.model.eval()
    V = run_.model.config.vocab_size
    assert loaded.config.vocab_size == V != stored["embed_out.weight"].shape[0]  # cut to 380, as Pythia to 50280
    ids = torch.tensor([[1, 5, 9, 200, V - 1, 7]])  # a Dolly token among them
    assert torch.equal(loaded(ids), run_.model(ids))
    assert json.loads((out / "run.json").read_text())["lora_targets"] == "query,key,value"


@pytest.mark.slow  # two trainings and transformers; the merge itself: tests/test_lora.py
def test_train_lora_export_merged_loads_in_transformers_and_sample_py_applies_the_adapter(ckpt, data, tmp_path):
    import subprocess
    import sys

    from transformers import GPTNeoXForCausalLM
    out = run(ckpt, data, tmp_path / "out", export_merged=True, lora_targets="query,value,dense_4h_to_h", **LORA)
    ids = torch.tensor([[1, 5, 9, 200, 379, 7]])
    ours = GPTNeoX.from_pretrained(ckpt, adapter=out)(ids)
    hf = GPTNeoXForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    assert_rel_close(hf, ours, FP32_LOGITS_REL, "the merged export in transformers vs base + adapter")
    texts = []
    for flags in (["--ckpt", ckpt, "--adapter", out], ["--ckpt", out / "merged"]):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, flags), "--prompt",
                            RECORDS[0]["instruction"], "--temperature", "0", "--max-new-tokens", "12", "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        texts.append(r.stdout)
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.slow  # the kill-and-resume mechanism is the full fine-tune's, which the default tier runs (test_train.py)
def test_train_lora_resume_after_kill_is_bit_exact(ckpt, data, tmp_path):
    args = dict(init=ckpt, data=data, max_steps=30, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=3,
                val_size=2, save_every=4, eval_every=5, sample_every=0, seed=3, lora_r=4, lora_dropout=0.1,
                lora_targets="query,value,dense")  # dropout: the resumed RNG stream matters
    kill_resume_and_compare(ckpt, data, tmp_path, args, 10, "adapter_model.safetensors")


@pytest.mark.slow  # two gloo processes under torchrun
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_train_lora_fsdp_two_processes_with_a_frozen_base_match_one(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 5)
    args = dict(init=ckpt, data=data, max_steps=4, batch_size=4, lr=3e-3, warmup_steps=1, val_size=3, save_every=2,
                eval_every=2, sample_every=4, device="cpu", lora_r=4, lora_dropout=0.0)
    argv = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    fsdp = torchrun(argv, tmp_path / "fsdp")
    one_process(args, micro_batch_size=2, out=str(tmp_path / "one"))
    assert "2 process(es)" in finish(fsdp)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for x, y in zip(one, two):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x.get("val_loss", 0) - y.get("val_loss", 0)) <= 1e-5
    a, b = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("one", "fsdp"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    state = load_state(tmp_path / "fsdp" / "checkpoints" / "step-00000004.pt")
    assert all(".lora_" in k for k in state["model"])  # gathered on process 0: the adapters only


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, message", [
    (["--lora-r", "-1"], "--lora-r: must be >= 0"),
    (["--lora-alpha", "16"], "--lora-alpha need(s) LoRA: add --lora-r R"),
    (["--export-merged"], "--export-merged need(s) LoRA"),
    (["--lora-r", "8", "--lora-targets", "query,qkv"], "unknown qkv; choose from query, key, value, dense, "
                                                       "dense_h_to_4h, dense_4h_to_h, embed_out"),
    (["--lora-r", "8", "--lora-alpha", "0"], "alpha must be a finite number > 0"),
    (["--lora-r", "8", "--lora-dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--lora-r", "8", "--quantize-base", "int3"], "invalid choice: 'int3'"),
    (["--quantize-base", "int4"], "--quantize-base need(s) LoRA"),
])
def test_train_lora_cli_refuses_bad_values_before_any_work(tmp_path, argv, message, capsys):
    assert_refused_before_any_work(tmp_path, argv, message, capsys)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_train_qlora_lowers_the_loss_on_a_quantized_base_and_its_adapter_loads_on_one(ckpt, data, tmp_path, mode):
    """--quantize-base: the frozen base held by gptneox.quantize, fp32 adapters trained through it."""
    out = run(ckpt, data, tmp_path / "out", quantize_base=mode, max_steps=6, **LORA)
    rows = metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < 0.95 * rows[0]["loss"]
    assert json.loads((out / "run.json").read_text())["quantize_base"] == mode
    state = load_file(out / "adapter_model.safetensors")
    assert state and all(t.dtype == torch.float32 for t in state.values())
    base = GPTNeoX.from_pretrained(ckpt, quantize=mode, group_size=128)
    loaded = GPTNeoX.from_pretrained(ckpt, quantize=mode, group_size=128, adapter=out)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        V = loaded.config.vocab_size  # cut to the adapter's vocabulary (the quantized rows too)
        assert V < base.config.vocab_size and (loaded(ids) - base(ids)[..., :V]).abs().max() > 1e-3, "no adapter"


def test_train_lora_defaults_and_a_different_run_in_the_same_out(ckpt, data, tmp_path):
    cfg, _ = TrainConfig(init="x", data="d.jsonl", out="o", lora_r=16).resolve()
    assert (cfg.lr, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (2e-4, 32, 0.05, ("query", "key", "value"))
    assert TrainConfig(init="x", data="d.jsonl", out="o").resolve()[0].lr == 5e-6  # full fine-tuning keeps Dolly's
    out = run(ckpt, data, tmp_path / "out", max_steps=2, **LORA)
    with pytest.raises(RunError, match=r"holds a different run \(.*lora_r: 8 there, None now"):
        run(ckpt, data, out, max_steps=2, lr=1e-2)


def test_train_lora_in_bf16_holds_the_frozen_base_in_bf16_and_the_adapters_in_fp32(ckpt, data, tmp_path):
    args = dict(init=str(ckpt), data=str(data), out=str(tmp_path / "out"), max_steps=3, batch_size=4,
                micro_batch_size=2, warmup_steps=0, val_size=2, save_every=3, eval_every=3, sample_every=0,
                progress=False, dtype="bf16", **LORA)
    run_, resume_file = loop.setup(TrainConfig(**args))
    loop.prepare(run_, resume_file)
    dtypes = {n: p.dtype for n, p in run_.model.named_parameters()}
    assert {dtypes[n] for n in lora_state_dict(run_.model)} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    loop.train_loop(run_)
    rows = metrics(tmp_path / "out")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_sample_py_refuses_an_adapter_directory_that_is_not_one(ckpt, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sample", ROOT / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    status = sample.cli.run(sample.main, sample.build_parser(), ["--ckpt", str(ckpt), "--adapter", str(tmp_path),
                                                                  "--prompt", "hi"])
    err = capsys.readouterr().err
    assert status == 2 and f"--adapter {tmp_path}: no adapter_config.json there" in err
