"""Checkpoint I/O: every published layout loads with HF's logits; saves load in transformers; bad input is named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import FORMS, hf_model, save_checkpoint
from tolerances import FP32_LOGITS_REL, assert_rel_close

from gptneox import CheckpointError, GPTNeoX
from gptneox.checkpoint import ShardWriter, parse_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf():
    return hf_model(num_hidden_layers=2)


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", FORMS)
def test_checkpoint_every_form_loads_with_hf_logits(form, hf, x, tmp_path):
    path = save_checkpoint(hf, tmp_path / form, form)
    model = GPTNeoX.from_pretrained(path, dtype=torch.float32)
    reference = hf
    if form == "bin-old":  # stored in fp16: compare with HF holding the same rounded weights
        reference = hf_model(num_hidden_layers=2).half().float()
    with torch.no_grad():
        assert_rel_close(model(x), reference(x).logits, FP32_LOGITS_REL, f"{form} logits")


def test_checkpoint_keeps_stored_dtype_by_default(hf, tmp_path):
    model = GPTNeoX.from_pretrained(save_checkpoint(hf, tmp_path / "old", "bin-old"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model = GPTNeoX.from_pretrained(tmp_path / "old", dtype=torch.bfloat16, backend="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.backend == "eager"
    assert not any(p.is_meta for p in model.parameters()) and not model.training


def test_checkpoint_reads_lm_head_name_and_bare_model_keys(hf, x, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers 5 names: lm_head.weight
    path = tmp_path / "ckpt"
    hf.config.save_pretrained(path)
    save_file(state, path / "model.safetensors")
    with torch.no_grad():
        assert_rel_close(GPTNeoX.from_pretrained(path)(x), hf(x).logits, FP32_LOGITS_REL, "lm_head.weight")
    bare = {k.removeprefix("gpt_neox."): v for k, v in state.items()}  # a GPTNeoXModel file plus the head
    save_file(bare, path / "model.safetensors")
    with torch.no_grad():
        assert_rel_close(GPTNeoX.from_pretrained(path)(x), hf(x).logits, FP32_LOGITS_REL, "bare keys")


@pytest.mark.parametrize("max_shard_size", ["5GB", "30KB"])
def test_checkpoint_save_loads_in_transformers(hf, x, tmp_path, max_shard_size):
    from transformers import GPTNeoXForCausalLM
    ours = GPTNeoX.from_pretrained(save_checkpoint(hf, tmp_path / "src", "safetensors"))
    ours.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if max_shard_size == "30KB":
        assert "model.safetensors.index.json" in files and "model-00001-of-" in files[2]  # [0]: the manifest
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ours.state_dict())
    else:
        assert files == [".gptneox-manifest.json", "config.json", "model.safetensors"]
    back = GPTNeoXForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), rtol=0, atol=0)
        torch.testing.assert_close(GPTNeoX.from_pretrained(tmp_path / "out")(x), ours(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".out.*")), "temporary directories left behind"


def test_checkpoint_save_tied_model_round_trips(x, tmp_path):
    from transformers import GPTNeoXForCausalLM
    hf = hf_model(tie_word_embeddings=True)
    ours = GPTNeoX.from_pretrained(save_checkpoint(hf, tmp_path / "src", "safetensors"))
    assert ours.embed_out.weight is ours.gpt_neox.embed_in.weight
    ours.save_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert_rel_close(GPTNeoXForCausalLM.from_pretrained(tmp_path / "out")(x).logits, hf(x).logits,
                         FP32_LOGITS_REL, "tied")


def test_checkpoint_save_is_atomic(hf, tmp_path, monkeypatch):
    import gptneox.checkpoint as ckpt
    ours = GPTNeoX.from_pretrained(save_checkpoint(hf, tmp_path / "src", "safetensors"))
    ours.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # a user's file beside the weights
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save_file(*args, **kwargs)

    save_file = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", crash_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        ours.save_pretrained(tmp_path / "out", max_shard_size="30KB", force=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left
    monkeypatch.undo()
    ours.save_pretrained(tmp_path / "out", max_shard_size="30KB", force=True)  # old weights go, user files stay
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" in names and "model.safetensors" not in names


def test_checkpoint_parse_size_and_shard(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5kb") == 1500 and parse_size("1") == 1
    with pytest.raises(ValueError, match="max_shard_size 'five gigs' is not a size"):
        parse_size("five gigs")
    for size in (0, -1, "0", "0GB", "0.0001KB"):  # 0 would write one tensor per shard
        with pytest.raises(ValueError, match=f"max_shard_size {size!r} is not a positive size"):
            parse_size(size)
    state = {"a": torch.zeros(10), "b": torch.zeros(30), "c": torch.zeros(5)}  # 40, 120, 20 bytes

    def shard(max_bytes):
        folder = tmp_path / str(max_bytes)
        folder.mkdir()
        writer = ShardWriter(folder, max_bytes)
        for name, t in state.items():
            writer.add(name, t)
        names = writer.close()
        return [list(safe_open(folder / name, "pt").keys()) for name in names], names

    assert shard(100) == ([["a"], ["b"], ["c"]], [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    assert shard(1000) == ([["a", "b", "c"]], ["model.safetensors"])


# ------------------------------------------------------------------------------------ replacing a directory
def contents(folder: Path) -> dict:
    """relative path -> bytes of every file under folder (None for a directory), hidden ones included."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def ours(hf, tmp_path_factory):
    return GPTNeoX.from_pretrained(save_checkpoint(hf, tmp_path_factory.mktemp("src") / "src", "safetensors"))


def test_checkpoint_save_replaces_a_checkpoint_only_with_force_keeping_user_files(ours, tmp_path, shared_data):
    from gptneox import Tokenizer
    out, tok = tmp_path / "out", Tokenizer.from_pretrained(Path(shared_data) / "pythia-tokenizer.json")
    ours.save_pretrained(out, tokenizer=tok)
    (out / "notes.txt").write_text("mine")
    before = contents(out)
    with pytest.raises(FileExistsError) as e:
        ours.save_pretrained(out, max_shard_size="30KB")
    assert str(e.value) == (f"{out} already holds the output of save_pretrained (config.json, model.safetensors); "
                            "pass force=True to replace it")  # tokenizer.json: not replaced without a tokenizer
    assert contents(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ours.save_pretrained(out, max_shard_size="30KB", tokenizer=tok, force=True)
    after = contents(out)
    assert after["notes.txt"] == b"mine"
    assert "model.safetensors" not in after and "model.safetensors.index.json" in after
    assert Tokenizer.from_pretrained(out).encode("Hello, I am") == [12092, 13, 309, 717]


@pytest.mark.parametrize("case", ["edited config.json", "user's tokenizer.json", "transformers' checkpoint"])
def test_checkpoint_save_with_force_refuses_what_gptneox_did_not_write(case, hf, ours, tmp_path, shared_data):
    from gptneox import Tokenizer
    out, tok = tmp_path / "out", Tokenizer.from_pretrained(Path(shared_data) / "pythia-tokenizer.json")
    if case == "transformers' checkpoint":
        hf.save_pretrained(out)
        named = "config.json, generation_config.json, model.safetensors"
    else:
        ours.save_pretrained(out)
        edited = "config.json" if case == "edited config.json" else "tokenizer.json"
        (out / edited).write_text('{"my": "notes"}')
        named = edited
    before = contents(out)
    with pytest.raises(FileExistsError, match=f"{out} holds {named}, not written by gptneox \\(or changed since\\)"):
        ours.save_pretrained(out, tokenizer=tok, force=True)
    assert contents(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_checkpoint_save_files_follow_the_umask(umask, ours, tmp_path):
    old = os.umask(umask)
    try:
        ours.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}, modes  # safetensors' own default: 0600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# ----------------------------------------------------------------------------------------------------- bad input
def test_checkpoint_missing_directory_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory not found"):
        GPTNeoX.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="expected a checkpoint directory, found a file"):
        GPTNeoX.from_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty: no model.safetensors, .* \(found: config.json\)"):
        GPTNeoX.from_pretrained(tmp_path / "empty")


def test_checkpoint_missing_shard_named_in_index(hf, tmp_path):
    path = save_checkpoint(hf, tmp_path / "c", "bin-sharded")
    (path / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json: names shard.* pytorch_model-00002-of"):
        GPTNeoX.from_pretrained(path)


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_checkpoint_truncated_file(hf, tmp_path, form):
    path = save_checkpoint(hf, tmp_path / "c", form)
    file = path / ("model.safetensors" if form == "safetensors" else "pytorch_model.bin")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{file}: corrupt or truncated"):
        GPTNeoX.from_pretrained(path)
    file.write_bytes(b"\xff" * 64)  # garbage header
    with pytest.raises(CheckpointError, match=f"{file}: corrupt or truncated"):
        GPTNeoX.from_pretrained(path)


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_checkpoint_missing_unexpected_and_misshapen_tensors(hf, tmp_path):
    path = save_checkpoint(hf, tmp_path / "c", "safetensors")
    _rewrite(path, lambda s: s.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match="missing tensor.* gpt_neox.layers.1.mlp.dense_4h_to_h.bias"):
        GPTNeoX.from_pretrained(path)
    path = save_checkpoint(hf, tmp_path / "d", "safetensors")
    _rewrite(path, lambda s: s.update({"gpt_neox.layers.0.attention.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'gpt_neox.layers.0.attention.extra'"):
        GPTNeoX.from_pretrained(path)
    path = save_checkpoint(hf, tmp_path / "e", "safetensors")
    _rewrite(path, lambda s: s.update({"embed_out.weight": torch.zeros(100, 64)}))
    with pytest.raises(CheckpointError, match=r"'embed_out.weight' has shape \[100, 64\], but config.json implies "
                                              r"\[101, 64\]"):
        GPTNeoX.from_pretrained(path)


def test_checkpoint_config_contradicting_weights(hf, tmp_path):
    path = save_checkpoint(hf, tmp_path / "c", "safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'gpt_neox.layers.1.* describes .1 layers"):
        GPTNeoX.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="has shape .* but config.json implies"):
        GPTNeoX.from_pretrained(path)


@pytest.mark.slow  # a memory measurement in a fresh process
def test_checkpoint_peak_memory_is_near_checkpoint_size():
    """Loading a checkpoint in its stored dtype holds it once (mmap + assign), not twice."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load_memory.py"), "--size-gb", "0.25"],
                         check=True, capture_output=True, text=True).stdout
    ratio = float(out.split("= ")[-1].split("x")[0])
    assert ratio <= 1.3, out


@pytest.mark.slow
@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_checkpoint_peak_memory_1gb(form):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_load_memory.py"), "--size-gb", "1.2",
                          "--form", form], check=True, capture_output=True, text=True).stdout
    assert float(out.split("= ")[-1].split("x")[0]) <= 1.3, out


def test_checkpoint_mixed_dtypes_load_as_one_dtype(hf, x, tmp_path):
    """A file with fp32 LayerNorms beside fp16 matrices loads as one model dtype (the first tensor's)."""
    from safetensors.torch import save_file
    path = save_checkpoint(hf, tmp_path / "c", "safetensors")
    state = {k: (v if "norm" in k else v.half()) for k, v in hf.state_dict().items()}
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v.contiguous() for k, v in state.items()}
    save_file(dict(sorted(state.items(), key=lambda kv: "norm" in kv[0])), path / "model.safetensors")
    model = GPTNeoX.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model(x).dtype == torch.float16


def test_checkpoint_tied_config_ignores_a_saved_head(x, tmp_path):
    hf = hf_model(tie_word_embeddings=True)
    path = save_checkpoint(hf, tmp_path / "c", "bin")  # torch.save of the full state dict: embed_out.weight too
    assert "embed_out.weight" in torch.load(path / "pytorch_model.bin", weights_only=True)
    with torch.no_grad():
        assert_rel_close(GPTNeoX.from_pretrained(path)(x), hf(x).logits, FP32_LOGITS_REL, "tied, head saved")
