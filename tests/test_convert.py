"""HF -> HF conversion (gptneox/convert.py, convert_weights.py): every layout, dtypes, sharding, atomic output, and
one clear error per kind of bad input."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import FORMS, hf_model, hf_state_dict, save_checkpoint
from tolerances import FP32_LOGITS_REL, assert_rel_close
from transformers import GPTNeoXForCausalLM

import gptneox.checkpoint as checkpoint
import gptneox.convert as convert
from gptneox import GPTNeoX, Tokenizer
from gptneox.checkpoint import CheckpointError
from gptneox.convert import HFCheckpoint, convert_hf, source_kind

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(1))


def output_tensors(path) -> dict:
    return dict(HFCheckpoint(path).tensors())


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


# ------------------------------------------------------------------------------------------------ atomic output
def test_convert_hf_never_overwrites_without_force(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert_hf(sources["safetensors"], dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert_hf(sources["safetensors"], dst, force=True)
    assert (dst / "model.safetensors").exists() and not (dst / "keep.txt").exists()


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


def test_convert_hf_refuses_to_write_onto_its_source(sources, tmp_path):
    src = shutil.copytree(sources["safetensors"], tmp_path / "src")
    with pytest.raises(ValueError, match="destination is the source"):
        convert_hf(src, src, force=True)


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
def _cli(monkeypatch, *args):
    """Run convert_weights.py as a script, in this process (no second torch import); returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["convert_weights.py", *map(str, args)])
    try:
        runpy.run_path(str(ROOT / "convert_weights.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_convert_weights_cli_converts_verifies_and_reports_errors(sources, tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, sources["bin-sharded"], tmp_path / "out", "--dtype", "bf16", "--verify", "--quiet") == 0
    out = capsys.readouterr().out
    assert "verified_tensors 28" in out and "logits_max_abs_diff 0.0" in out and "peak host memory" in out
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(tmp_path / "out").values())
    code = _cli(monkeypatch, sources["bin"], tmp_path / "out", "--quiet")
    assert isinstance(code, str) and code.startswith("error:") and "already exists; pass --force" in code


def test_convert_hf_verify_catches_a_changed_tensor_and_leaves_no_output(sources, tmp_path, monkeypatch):
    real_add = convert.ShardWriter.add

    def corrupting_add(self, name, tensor):
        real_add(self, name, tensor + 1 if name == "gpt_neox.layers.1.attention.dense.bias" else tensor)

    monkeypatch.setattr(convert.ShardWriter, "add", corrupting_add)
    with pytest.raises(CheckpointError, match="verify: tensor 'gpt_neox.layers.1.attention.dense.bias' differs"):
        convert_hf(sources["bin"], tmp_path / "out", verify=True)
    assert list(tmp_path.iterdir()) == []
