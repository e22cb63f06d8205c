"""FSDP: train.py under torchrun with 2 CPU processes (gloo, full sharding) matches one process at the same global
batch, step by step, including the sharded save, the validation loss and the sampled answer."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import RECORDS, TINY, metrics, small_tokenizer, write_jsonl
from tiny import hf_model

from gptneox.train.state import load_state

pytestmark = pytest.mark.slow  # two gloo processes under torchrun, twice: ~20 s
ROOT = Path(__file__).resolve().parents[1]
LOSS_ABS = 1e-5  # the bar: per-step loss within 1e-5 of the single-process run


def load_train():
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(argv, out):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *argv, "--micro-batch-size", "1", "--out", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_process(args, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_train().main(**{**args, "init": str(args["init"]), "data": str(args["data"])}, progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def finish(p, again=None):
    """The launch's stdout once it succeeded. A launch killed by a signal (seen once in five runs on a machine at
    load 9: SIGABRT inside the launcher, before any training step) is started afresh once by `again`."""
    stdout, stderr = p.communicate(timeout=300)
    if p.returncode < 0 and again is not None:
        return finish(again())
    assert p.returncode == 0, stderr[-3000:]
    return stdout


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run src as if it had been killed just after saving step `step`."""
    shutil.copytree(src, dst)
    for f in (dst / "checkpoints").iterdir():
        if int(f.stem.split("-")[1]) > step:
            f.unlink()
    (dst / "model.safetensors").unlink()
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run on 2 FSDP processes (micro-batch 1 each) and on one (2 accumulated micro-batches of 2)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ckpt = tmp / "ckpt"
    hf_model(0, **TINY).save_pretrained(ckpt)
    small_tokenizer(ckpt / "tokenizer.json")
    args = dict(init=ckpt, data=write_jsonl(tmp / "d.jsonl", RECORDS * 5), max_steps=6, batch_size=4, lr=3e-3,
                warmup_steps=2, val_size=3, save_every=3, eval_every=3, sample_every=6, device="cpu")
    argv = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    fsdp = torchrun(argv, tmp / "fsdp")
    one_process(args, micro_batch_size=2, out=str(tmp / "one"))  # meanwhile

    def again():
        shutil.rmtree(tmp / "fsdp", ignore_errors=True)
        return torchrun(argv, tmp / "fsdp")
    return tmp, args, argv, finish(fsdp, again)


def assert_same_run(one, two):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ABS, (a, b)
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) <= LOSS_ABS, (a, b)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_fsdp_two_gloo_processes_match_one_process(runs):
    tmp, _, _, stdout = runs
    assert "2 process(es)" in stdout and stdout.count("step 6 sample") == 1  # logs from process 0 only
    one, two = metrics(tmp / "one"), metrics(tmp / "fsdp")
    assert [r["step"] for r in two] == list(range(1, 7)) and one[-1]["loss"] < one[0]["loss"]
    assert_same_run(one, two)
    wa, wb = load_file(tmp / "one" / "model.safetensors"), load_file(tmp / "fsdp" / "model.safetensors")
    assert wa.keys() == wb.keys()
    nh, hs = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    for k in wa:
        a, b = wa[k], wb[k]
        if k.endswith("query_key_value.bias"):
            # the key bias has an exactly zero gradient (it adds q.b_k to every score of a row, which softmax
            # ignores), so Adam turns float noise into lr-sized steps there: compare only q and v biases
            a, b = (t.view(nh, 3, hs)[:, [0, 2]] for t in (a, b))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    state = load_state(tmp / "fsdp" / "checkpoints" / "step-00000006.pt")  # gathered whole by process 0
    assert state["step"] == 6 and torch.equal(state["model"]["embed_out.weight"], wb["embed_out.weight"])
    assert json.loads((tmp / "fsdp" / "run.json").read_text()) == json.loads((tmp / "one" / "run.json").read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_fsdp_resumes_a_one_process_state_and_the_reverse(runs):
    tmp, args, argv, _ = runs
    # a one-process state, resumed by 2 FSDP processes (process 0 reads it and broadcasts the shards) ...
    sharded = cut_back(tmp / "one", tmp / "one-then-fsdp", 3)
    p = torchrun([*argv, "--resume"], sharded)

    def again():
        shutil.rmtree(sharded)
        return torchrun([*argv, "--resume"], cut_back(tmp / "one", sharded, 3))
    # ... and an FSDP state (gathered whole when saved), resumed by one process
    single = cut_back(tmp / "fsdp", tmp / "fsdp-then-one", 3)
    one_process(args, micro_batch_size=2, out=str(single), resume=True)
    assert "resumed from" in finish(p, again)
    for out in (sharded, single):
        assert_same_run(metrics(tmp / "one"), metrics(out))
        assert (out / "model.safetensors").exists()
