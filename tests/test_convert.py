"""HF -> HF conversion (gptneox/convert/, convert_weights.py): every layout, dtypes, sharding, atomic output, and
one clear error per kind of bad input."""

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import FORMS, hf_model, hf_state_dict, save_checkpoint
from tolerances import FP32_LOGITS_REL, assert_rel_close
from transformers import GPTNeoXForCausalLM

import gptneox.checkpoint as checkpoint
import gptneox.convert.hf as convert
from gptneox import GPTNeoX, Tokenizer, cli
from gptneox.checkpoint import CheckpointError
from gptneox.convert import HFCheckpoint, convert_hf, source_kind

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(1))


def output_tensors(path) -> dict:
    return dict(HFCheckpoint(path).tensors())


def contents(folder: Path) -> dict:
    """relative path -> bytes of every file under folder, and None for every directory."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def model():
    return hf_model(0)


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """One source directory per published form, written once for the module."""
    root = tmp_path_factory.mktemp("sources")
    return {form: save_checkpoint(model, root / form, form) for form in FORMS}


@pytest.mark.parametrize("form", FORMS)
def test_convert_hf_every_layout_gives_identical_tensors_and_logits(form, model, sources, tmp_path):
    dst = tmp_path / "out"
    summary = convert_hf(sources[form], dst, max_shard_size="100KB", verify=True)
    assert summary["verified_tensors"] == 28 and summary["logits_max_abs_diff"] == 0.0
    assert len(summary["files"]) > 1 and (dst / "model.safetensors.index.json").exists()
    ref = {k: v.half() if form == "bin-old" else v for k, v in hf_state_dict(model).items()}  # bin-old is fp16
    got = output_tensors(dst)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    reference = hf_model(0)
    with torch.no_grad():
        for p in reference.parameters():  # the fp16 file's values (not .half() on the module: it rounds inv_freq)
            p.copy_(p.half() if form == "bin-old" else p)
        expected = reference(IDS).logits
        hf = GPTNeoXForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager").eval()
        assert torch.equal(hf(IDS).logits, expected)  # transformers reads the output as the source model
        ours = GPTNeoX.from_pretrained(dst, dtype=torch.float32)(IDS)
    assert_rel_close(ours, expected, FP32_LOGITS_REL, f"gptneox logits from the {form} conversion")


def test_convert_hf_drops_stale_buffers_and_normalizes_config(sources, tmp_path):
    convert_hf(sources["bin-old"], tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert len(names) == 28 and not any(n.endswith(("attention.bias", "masked_bias", "inv_freq")) for n in names)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert config["rope_parameters"]["partial_rotary_factor"] == config["rotary_pct"] == 0.25
    assert config["use_parallel_residual"] is True and config["eos_token_id"] == 0


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                ("fp32", torch.float32)])
def test_convert_hf_dtype_casts_every_tensor(dtype, torch_dtype, sources, tmp_path):
    src = sources["bin-old"] if dtype == "fp32" else sources["safetensors"]  # fp16 -> fp32 widens exactly
    summary = convert_hf(src, tmp_path / "out", dtype=dtype, verify=True)
    src_tensors = output_tensors(src)
    for name, t in output_tensors(tmp_path / "out").items():
        assert t.dtype == torch_dtype and torch.equal(t, src_tensors[name].to(torch_dtype)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == summary["dtype"]
    assert summary["dtype"] == str(torch_dtype).removeprefix("torch.")


def test_convert_hf_shards_stay_under_max_size(model, sources, tmp_path):
    limit, total = 40_000, sum(t.nbytes for t in hf_state_dict(model).values())
    convert_hf(sources["safetensors"], tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 28 and index["metadata"]["total_size"] == total
    for file in set(index["weight_map"].values()):
        with safe_open(tmp_path / "out" / file, framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert len(sizes) == 1 or sum(sizes) <= limit, (file, sizes)  # a bigger tensor gets a shard of its own


def test_convert_hf_copies_tokenizer_files(sources, shared_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["bin"], src)
    shutil.copy(Path(shared_data) / "pythia-tokenizer.json", src / "tokenizer.json")
    (src / "optimizer.pt").write_bytes(b"not copied")
    convert_hf(src, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "optimizer.pt").exists()
    assert Tokenizer.from_pretrained(tmp_path / "out").encode("Hello, I am") == [12092, 13, 309, 717]


# ------------------------------------------------------------------------------------- destinations, atomic output
def test_convert_hf_never_overwrites_without_force(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    convert_hf(sources["safetensors"], dst)  # an empty directory holds nothing to lose
    before = contents(dst)
    with pytest.raises(FileExistsError) as e:
        convert_hf(sources["safetensors"], dst)
    assert str(e.value) == (f"{dst} already holds the output of convert_weights.py --to hf (config.json, "
                            "generation_config.json, model.safetensors); pass force=True to replace it")
    assert contents(dst) == before and "--force" not in str(e.value)  # the Python API's spelling only


def test_convert_hf_force_replaces_only_an_earlier_conversion(sources, shared_data, tmp_path):
    src = shutil.copytree(sources["safetensors"], tmp_path / "src")
    shutil.copy(Path(shared_data) / "pythia-tokenizer.json", src / "tokenizer.json")
    dst = tmp_path / "out"
    convert_hf(src, dst, max_shard_size="40KB")  # config.json, shards + index, generation_config, tokenizer.json
    convert_hf(src, dst, dtype="bf16", force=True)  # an earlier conversion's output: replaced
    assert sorted(p.name for p in dst.iterdir()) == [".gptneox-manifest.json", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json"]  # shards, index: gone
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(dst).values())
    (dst / "notes.txt").write_text("mine")
    (dst / "runs").mkdir()
    before = contents(dst)
    with pytest.raises(FileExistsError, match=r"out holds notes.txt, runs/, not written by convert_weights.py \(or "
                                              r"changed since\): move them away or choose another destination"):
        convert_hf(src, dst, force=True)
    assert contents(dst) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("edit", ["config.json", "tokenizer.json", "model.safetensors"])
def test_convert_hf_force_refuses_an_earlier_conversion_edited_since(edit, sources, shared_data, tmp_path):
    src = shutil.copytree(sources["safetensors"], tmp_path / "src")
    shutil.copy(Path(shared_data) / "pythia-tokenizer.json", src / "tokenizer.json")
    dst = tmp_path / "out"
    convert_hf(src, dst)
    file = dst / edit
    file.write_bytes(file.read_bytes().replace(b"0", b"1", 1))  # one character: the size stays
    before = contents(dst)
    with pytest.raises(FileExistsError, match=f"out holds {edit}, not written by convert_weights.py \\(or changed"):
        convert_hf(src, dst, force=True)
    assert contents(dst) == before


def test_convert_hf_force_refuses_a_training_run(sources, tmp_path):
    out = tmp_path / "dolly-tiny-init"  # what train.py leaves: its export (save_pretrained) beside the run's files
    GPTNeoX.from_pretrained(sources["safetensors"]).save_pretrained(out)
    (out / "run.json").write_text('{"init": "pythia-14m"}')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-00000004.pt").write_bytes(b"training state")
    before = contents(out)
    with pytest.raises(FileExistsError, match="dolly-tiny-init holds checkpoints/, config.json, model.safetensors, "
                                              "run.json, not written by convert_weights.py"):
        convert_hf(sources["safetensors"], out, force=True)
    assert contents(out) == before


def test_convert_hf_failure_leaves_no_checkpoint(sources, tmp_path, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = checkpoint.save_file  # where the shard writer looks it up
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_hf(sources["safetensors"], tmp_path / "out", max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []  # neither dst nor the hidden temporary directory


OVERLAPS = {  # case -> (dst given relative to tmp_path, or a function of the source; the message)
    "is the source": (lambda src: src, "is the source"),
    "is the source, by a symlink": (lambda src: src.parent.parent / "link", "is the source"),
    "contains the source": (lambda src: src.parent, "contains the source"),  # parent/src -> parent --force
    "contains the source, relative": (lambda src: Path(".."), "contains the source"),  # run from inside src
    "lies inside the source": (lambda src: src / "out", "lies inside the source"),
}


@pytest.mark.parametrize("case", OVERLAPS)
def test_convert_hf_refuses_a_destination_overlapping_its_source(case, sources, tmp_path, monkeypatch, capsys):
    src = Path(shutil.copytree(sources["safetensors"], tmp_path / "parent" / "src"))
    (tmp_path / "parent" / "notes.txt").write_text("beside the source")
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(src)
    dst, message = OVERLAPS[case]
    before = contents(tmp_path)
    with pytest.raises(ValueError, match=f"the destination {dst(src).resolve()} {message} {src}"):
        convert_hf(src, dst(src), force=True)
    assert _cli(monkeypatch, src, dst(src), "--force") == 1  # the command line: exit 1, nothing written
    assert f"{message} {src}" in capsys.readouterr().err
    assert contents(tmp_path) == before


def test_convert_weights_killed_mid_write_leaves_the_old_output_and_the_next_run_cleans_up(sources, tmp_path,
                                                                                            monkeypatch):
    src, dst = sources["safetensors"], tmp_path / "out"
    convert_hf(src, dst)
    before = contents(dst)
    killed = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, src, dst, "--force", "--max-shard-size", "40KB"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".out.tmp-{killed.pid}"
    deadline = time.monotonic() + 60
    while not (tmp / "part-00000.tmp").exists():  # the first shard is written: kill it mid-conversion
        assert killed.poll() is None and time.monotonic() < deadline, "the slowed conversion never started writing"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert tmp.is_dir() and contents(dst) == before  # the stale temporary; the old output intact
    assert _cli(monkeypatch, src, dst, "--force", "--dtype", "bf16") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden temporary left
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(dst).values())


# ---------------------------------------------------------------------------------------------------- bad input
def _copy(sources, form, tmp_path) -> Path:
    return Path(shutil.copytree(sources[form], tmp_path / "src"))


def test_convert_hf_rejects_unknown_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "flax_model.msgpack").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="unknown layout.*flax_model.msgpack"):
        source_kind(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_model(0).config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*flax_model.msgpack"):
        convert_hf(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_hf_rejects_single_file_beside_index(sources, tmp_path):
    src = _copy(sources, "safetensors-sharded", tmp_path)
    shutil.copy(sources["safetensors"] / "model.safetensors", src)
    with pytest.raises(CheckpointError, match="mixed layout: both model.safetensors and model.safetensors.index"):
        convert_hf(src, tmp_path / "out")


def test_convert_hf_rejects_shard_missing_from_index(sources, tmp_path):
    src = _copy(sources, "bin-sharded", tmp_path)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "00003" not in v}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00003.bin are not named in the index"):
        convert_hf(src, tmp_path / "out")


def test_convert_hf_rejects_shards_without_index(sources, tmp_path):
    src = _copy(sources, "safetensors-sharded", tmp_path)
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="but no model.safetensors.index.json"):
        convert_hf(src, tmp_path / "out")


def test_convert_hf_rejects_missing_shard(sources, tmp_path):
    src = _copy(sources, "bin-sharded", tmp_path)
    (src / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="names shard.*pytorch_model-00002-of-00003.bin"):
        convert_hf(src, tmp_path / "out")


def test_convert_hf_rejects_index_that_misplaces_a_tensor(sources, tmp_path):
    src = _copy(sources, "bin-sharded", tmp_path)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "pytorch_model-00002-of-00003.bin")
    index["weight_map"][key] = "pytorch_model-00001-of-00003.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"00002-of-00003.bin: holds '{key}', but pytorch_model.bin.index.json"):
        convert_hf(src, tmp_path / "out")


@pytest.mark.parametrize("form, file", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_convert_hf_rejects_truncated_file(form, file, sources, tmp_path):
    src = _copy(sources, form, tmp_path)
    data = (src / file).read_bytes()
    (src / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{file}: corrupt or truncated"):
        convert_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_hf_rejects_config_that_disagrees_with_tensors(sources, tmp_path):
    src = _copy(sources, "safetensors", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.dense_4h_to_h.weight. has shape \[64, 256\], but "
                                              r"config.json implies \[64, 128\]"):
        convert_hf(src, tmp_path / "out")


def test_convert_hf_rejects_missing_tensor(sources, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sources["bin"] / "config.json", src)
    state = torch.load(sources["bin"] / "pytorch_model.bin", weights_only=True)
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing tensor.*layers.1.mlp.dense_4h_to_h.bias"):
        convert_hf(src, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------- CLI
# convert_weights.py with every shard write slowed down, so a test can kill it mid-conversion
SLOW_WRITER = """
import runpy, sys, time
import gptneox.checkpoint
save_file = gptneox.checkpoint.save_file
def slow_save_file(*args, **kwargs):
    save_file(*args, **kwargs)
    time.sleep(60)
gptneox.checkpoint.save_file = slow_save_file
sys.argv[0] = "convert_weights.py"
runpy.run_path("convert_weights.py", run_name="__main__")
"""
FLAGS = ("--to", "--dtype", "--max-shard-size", "--verify", "--force", "--tp", "--no-pipe", "--neox-config",
         "--tokenizer", "--trust-pickle", "--logits-max-params", "--no-progress", "--quiet", "--quantize",
         "--group-size")


def _cli(monkeypatch, *args):
    """Run convert_weights.py as a script, in this process (no second torch import); returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["convert_weights.py", *map(str, args)])
    try:
        runpy.run_path(str(ROOT / "convert_weights.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def _script(*args):
    """Run convert_weights.py as a user does: a new process, default environment."""
    env = {k: v for k, v in os.environ.items() if k != "GPTNEOX_TRACEBACK"}
    return subprocess.run([sys.executable, "convert_weights.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_convert_weights_default_flags_draw_a_bar_and_give_identical_logits(model, sources, tmp_path):
    run = _script(sources["bin-sharded"], tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert "converting" in run.stderr and "28/28" in run.stderr  # tqdm's bar, on by default
    assert "tensors 28" in run.stdout and "peak host memory" in run.stdout
    with torch.no_grad():
        expected = model(IDS).logits
        hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
        assert torch.equal(hf.eval()(IDS).logits, expected)
        ours = GPTNeoX.from_pretrained(tmp_path / "out")(IDS)
        assert torch.equal(ours, GPTNeoX.from_pretrained(sources["bin-sharded"])(IDS))
    assert_rel_close(ours, expected, FP32_LOGITS_REL, "gptneox logits of the converted checkpoint")


def test_convert_weights_force_never_replaces_a_users_directory(sources, tmp_path):
    """The user's command, verbatim: default flags (progress bars on), relative paths, a source converted before."""
    convert_hf(sources["safetensors"], tmp_path / "out" / "model")
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "config.json").write_text('{"my":"notes"}\n')
    (tmp_path / "userdir" / "tokenizer.json").write_text("notes\n")
    env = {k: v for k, v in os.environ.items() if k != "GPTNEOX_TRACEBACK"}
    run = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "out/model", "userdir", "--force"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (f"convert_weights.py: error: {tmp_path / 'userdir'} holds config.json, tokenizer.json, not "
                          "written by convert_weights.py (or changed since): move them away or choose another "
                          "destination\n")
    assert contents(tmp_path / "userdir") == {"config.json": b'{"my":"notes"}\n', "tokenizer.json": b"notes\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "userdir"]  # no temporary either


def test_convert_weights_files_follow_the_umask(sources, shared_data, tmp_path):
    """Every output file (safetensors shards too, which safetensors creates 0600) gets 0666 less the umask, as with
    any other tool: convert_weights.py's command line run in one fresh process at umask 022, then 077."""
    src = shutil.copytree(sources["safetensors"], tmp_path / "src")
    shutil.copy(Path(shared_data) / "pythia-tokenizer.json", src / "tokenizer.json")
    (src / "tokenizer.json").chmod(0o600)  # the copy's mode comes from the umask, not from the source
    runs = [(umask, [str(src), str(tmp_path / f"{umask:03o}" / out), *flags, "--quiet"]) for umask in (0o022, 0o077)
            for out, flags in (("hf", ["--max-shard-size", "100KB"]), ("neox", ["--to", "neox"]))]
    code = ("import os, runpy, sys\n"
            f"for umask, argv in {runs!r}:\n"
            "    os.umask(umask)\n"
            "    sys.argv = ['convert_weights.py', *argv]\n"
            "    try:\n"
            "        runpy.run_path('convert_weights.py', run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (argv, e.code)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for umask in (0o022, 0o077):
        files = [p for p in (tmp_path / f"{umask:03o}").glob("**/*") if p.is_file()]
        assert len(files) > 8 and {p.name for p in files} >= {"model-00001-of-00007.safetensors", "tokenizer.json",
                                                              "layer_00-model_00-model_states.pt", "model.yml"}
        assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == {
            str(p.relative_to(tmp_path)): oct(0o666 & ~umask) for p in files}


def test_convert_weights_exit_codes_usage_2_runtime_1_without_traceback(tmp_path):
    usage = _script(tmp_path / "src", tmp_path / "out", "--tp", "2")
    assert usage.returncode == 2 and usage.stderr.startswith("usage: convert_weights.py")
    assert usage.stderr.splitlines()[-1] == "convert_weights.py: error: --tp: only with --to neox"
    runtime = _script(tmp_path / "missing", tmp_path / "out")
    assert runtime.returncode == 1 and "Traceback" not in runtime.stderr
    assert runtime.stderr == f"convert_weights.py: error: {tmp_path / 'missing'}: no such checkpoint directory\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (("--no-pipe",), "--no-pipe: only with --to neox"),
    (("--to", "neox", "--max-shard-size", "1GB"), "--max-shard-size: not with --to neox"),
    (("--logits-max-params", "10"), "--logits-max-params: only with --verify"),
    (("--neox-config", "x.yml"), "--neox-config: only for a gpt-neox source, but .* is a Hugging Face checkpoint"),
    (("--dtype", "int8"), "argument --dtype: invalid dtype 'int8'"),
    (("--max-shard-size", "five gigs"), "argument --max-shard-size: 'five gigs' is not a size"),
    (("--max-shard-size", "0"), "argument --max-shard-size: '0' is not a positive size"),  # one tensor per shard
    (("--max-shard-size", "0GB"), "argument --max-shard-size: '0GB' is not a positive size"),
])
def test_convert_weights_contradicting_flags_are_usage_errors(args, message, sources, tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, sources["bin"], tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: convert_weights.py") and re.search(f"convert_weights.py: error: {message}", err)
    assert "max_shard_size" not in err  # the flag's spelling, never the Python name
    assert not (tmp_path / "out").exists()


def test_convert_weights_cli_converts_verifies_and_reports_errors(sources, tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, sources["bin-sharded"], tmp_path / "out", "--dtype", "bfloat16", "--verify",
                "--quiet") == 0
    captured = capsys.readouterr()
    assert "verified_tensors 28" in captured.out and "logits_max_abs_diff 0.0" in captured.out
    assert "converting" not in captured.err  # --quiet: no bar
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(tmp_path / "out").values())
    assert _cli(monkeypatch, sources["bin"], tmp_path / "out", "--no-progress") == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_weights.py: error: ") and err.endswith("; pass --force to replace it\n")
    assert len(err.splitlines()) == 1 and "force=True" not in err


def test_convert_weights_accepts_underscore_spellings(sources, tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, sources["safetensors"], tmp_path / "out", "--max_shard_size", "40KB", "--no_progress",
                "--logits_max_params=0", "--verify", "--dtype", "fp16") == 0
    out = capsys.readouterr().out
    assert "verified_tensors 28" in out and "logits_max_abs_diff" not in out  # 0 params: tensors only
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert all(t.dtype == torch.float16 for t in output_tensors(tmp_path / "out").values())


def test_convert_weights_help_explains_every_flag(monkeypatch, capsys):
    parsers = []
    monkeypatch.setattr(cli, "run", lambda main, parser, argv=None: parsers.append(parser) or 0)
    assert _cli(monkeypatch) == 0
    actions = [a for a in parsers[0]._actions if a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert {s for a in actions for s in a.option_strings} == set(FLAGS)  # dash spellings; underscores by alias
    monkeypatch.undo()
    assert _cli(monkeypatch, "--help") == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in FLAGS) and "an earlier conversion's output" in text


def test_convert_hf_verify_catches_a_changed_tensor_and_leaves_no_output(sources, tmp_path, monkeypatch):
    real_add = convert.ShardWriter.add

    def corrupting_add(self, name, tensor):
        real_add(self, name, tensor + 1 if name == "gpt_neox.layers.1.attention.dense.bias" else tensor)

    monkeypatch.setattr(convert.ShardWriter, "add", corrupting_add)
    with pytest.raises(CheckpointError, match="verify: tensor 'gpt_neox.layers.1.attention.dense.bias' differs"):
        convert_hf(sources["bin"], tmp_path / "out", verify=True)
    assert list(tmp_path.iterdir()) == []
