"""gpt-neox native checkpoints (gptneox/convert/neox.py): reading DeepSpeed files at TP 1/2/4, merge rules, HF -> NeoX
-> HF, and one clear error per kind of bad NeoX input."""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import checkpoint_with_tokenizer, hf_model, hf_state_dict, save_checkpoint
from transformers import GPTNeoXForCausalLM

from gptneox import Tokenizer
from gptneox.checkpoint import CheckpointError
from gptneox.convert import HFCheckpoint, convert_hf, convert_neox, export_neox
from gptneox.convert.neox import config_from_neox, merge, read_neox_args, split

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(2))
SHAPE = dict(num_attention_heads=4, vocab_size=104)  # heads and vocab divisible by TP 4
# a Pythia-style config (JSON-like YAML, dashed keys, comments), as EleutherAI/pythia models/*.yml
PYTHIA_YML = """# tiny pythia
{
  "pipe-parallel-size": 1,
  "model-parallel-size": %(tp)d,
  "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 128,
  "max-position-embeddings": 128, "pos-emb": "rotary", "rotary-pct": 0.25, "no-weight-tying": true,
  "gpt-j-residual": true, "output-layer-parallelism": "column", "norm": "layernorm",
  "attention-config": [[["flash"], 2]], "layernorm-epsilon": 1.0e-5, "bias-gelu-fusion": true,
  "fp16": {"enabled": true, "type": "bfloat16"}, "tokenizer-type": "HFTokenizer",
}
"""
LEGACY_MLP = {"h_to_4h": "mlp.dense_h_to_4h", "4h_to_h": "mlp.dense_4h_to_h"}
NEW_MLP = {"h_to_4h": "mlp.linear1", "4h_to_h": "mlp.linear2"}


def synthesize_neox(state: dict, path: Path, tp: int, pipe=True, mlp=LEGACY_MLP, yml=PYTHIA_YML) -> Path:
    """Write HF tensors as gpt-neox would hold them at TP degree tp, written out here independently of neox.py:
    column-parallel rows and row-parallel columns split by rank, row-parallel biases split into tp addends b / tp,
    LayerNorms replicated."""
    path.mkdir(parents=True)
    L = 2
    rows = lambda t: list(t.chunk(tp, 0))  # noqa: E731
    cols = lambda t: list(t.chunk(tp, 1))  # noqa: E731
    same = lambda t: [t] * tp  # noqa: E731
    layers = {0: {"word_embeddings.weight": rows(state["gpt_neox.embed_in.weight"])},
              L + 3: {"norm.weight": same(state["gpt_neox.final_layer_norm.weight"]),
                      "norm.bias": same(state["gpt_neox.final_layer_norm.bias"])},
              L + 4: {"final_linear.weight": rows(state["embed_out.weight"])}}
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        layers[i + 2] = {
            "input_layernorm.weight": same(state[p + "input_layernorm.weight"]),
            "input_layernorm.bias": same(state[p + "input_layernorm.bias"]),
            "post_attention_layernorm.weight": same(state[p + "post_attention_layernorm.weight"]),
            "post_attention_layernorm.bias": same(state[p + "post_attention_layernorm.bias"]),
            "attention.query_key_value.weight": rows(state[p + "attention.query_key_value.weight"]),
            "attention.query_key_value.bias": rows(state[p + "attention.query_key_value.bias"]),
            "attention.dense.weight": cols(state[p + "attention.dense.weight"]),
            "attention.dense.bias": [state[p + "attention.dense.bias"] / tp] * tp,
            "attention.rotary_emb.inv_freq": same(1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4)),
            mlp["h_to_4h"] + ".weight": rows(state[p + "mlp.dense_h_to_4h.weight"]),
            mlp["h_to_4h"] + ".bias": rows(state[p + "mlp.dense_h_to_4h.bias"]),
            mlp["4h_to_h"] + ".weight": cols(state[p + "mlp.dense_4h_to_h.weight"]),
            mlp["4h_to_h"] + ".bias": [state[p + "mlp.dense_4h_to_h.bias"] / tp] * tp,
        }
    for r in range(tp):
        ranks = {ll: {k: v[r].clone() for k, v in d.items()} for ll, d in layers.items()}
        if pipe:
            for ll, d in ranks.items():
                torch.save(d, path / f"layer_{ll:02d}-model_{r:02d}-model_states.pt")
        else:
            module = {f"sequential.{ll}.{k}": v for ll, d in ranks.items() for k, v in d.items()}
            torch.save({"module": module}, path / f"mp_rank_{r:02d}_model_states.pt")
    (path / "configs").mkdir()
    (path / "configs" / "pythia-tiny.yml").write_text(yml % {"tp": tp})
    return path


@pytest.fixture(scope="module")
def model():
    return hf_model(3, **SHAPE)


def logits(path) -> torch.Tensor:
    with torch.no_grad():
        hf = GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        return hf(IDS).logits


def assert_same_tensors(path, state):
    got = dict(HFCheckpoint(path).tensors())
    assert got.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(got[name], t), name


# --------------------------------------------------------------------------------------------- NeoX -> HF
@pytest.mark.parametrize("tp, pipe, mlp", [(1, True, LEGACY_MLP), (2, True, LEGACY_MLP), (4, True, LEGACY_MLP),
                                           (2, False, LEGACY_MLP), (1, False, LEGACY_MLP), (2, True, NEW_MLP)])
def test_neox_synthesized_checkpoint_converts_to_the_same_tensors_and_logits(tp, pipe, mlp, model, tmp_path):
    state = hf_state_dict(model)
    src = synthesize_neox(state, tmp_path / "global_step0", tp, pipe, mlp)
    summary = convert_neox(src, tmp_path / "hf", verify=True)
    assert summary["tp"] == tp and summary["verified_tensors"] == 28 and summary["logits_max_abs_diff"] == 0.0
    assert_same_tensors(tmp_path / "hf", state)
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "hf"), model(IDS).logits)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 0 and config["rotary_pct"] == 0.25


def test_neox_conversion_copies_the_tokenizer(model, shared_data, tmp_path):
    src = synthesize_neox(hf_state_dict(model), tmp_path / "global_step0", tp=1)
    shutil.copy(Path(shared_data) / "pythia-tokenizer.json", tmp_path / "20B_tokenizer.json")
    convert_neox(src, tmp_path / "hf", tokenizer=tmp_path / "20B_tokenizer.json")
    assert Tokenizer.from_pretrained(tmp_path / "hf").encode("My favorite food is") == [3220, 7583, 2739, 310]


def test_neox_merge_follows_megatron_rules():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(merge("column", [a, b], True), torch.cat([a, b], 0))
    assert torch.equal(merge("row", [a, b], True), torch.cat([a, b], 1))
    assert torch.equal(merge("row_bias", [a[0], b[0]], True), ((a[0].double() + b[0].double())).float())  # summed
    assert torch.equal(merge("row_bias", [a[0], a[0]], False), a[0])  # sequential residual: added once
    assert torch.allclose(merge("replicated", [a[0], b[0]], True), (a[0] + b[0]) / 2)  # LayerNorm drift averaged


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["column", "row", "row_bias", "replicated"])
def test_neox_split_then_merge_is_identity(kind, tp):
    t = torch.randn(8, 8, dtype=torch.bfloat16) if kind != "row_bias" else torch.randn(8) * 1e-3
    for parallel in (True, False):
        parts = split(kind, t, tp, parallel)
        assert len(parts) == tp and torch.equal(merge(kind, parts, parallel), t)
    if kind == "column":
        assert parts[0].shape == (8 // tp, 8)


def test_neox_config_reads_pythia_yaml_and_defaults(tmp_path):
    (tmp_path / "a.yml").write_text(PYTHIA_YML % {"tp": 2})
    (tmp_path / "b.yml").write_text("{intermediate_size: 512, rotary_emb_base: 500}")  # underscores, later wins
    args, source = read_neox_args([tmp_path / "a.yml", tmp_path / "b.yml"])
    config = config_from_neox(args, 104, source)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 512)
    assert config.rotary_pct == 0.25 and config.rotary_emb_base == 500.0 and config.max_position_embeddings == 128
    assert config.use_parallel_residual and not config.tie_word_embeddings and config.eos_token_id == 0
    bare = config_from_neox({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "rotary"}, 104)
    assert bare.rotary_pct == 1.0 and bare.intermediate_size == 256 and bare.tie_word_embeddings  # gpt-neox defaults
    assert not bare.use_parallel_residual


# --------------------------------------------------------------------------------------- HF -> NeoX -> HF
@pytest.mark.parametrize("tp, pipe, parallel, tied", [(1, True, True, False), (2, True, True, False),
                                                      (4, True, True, False), (4, False, True, False),
                                                      (2, True, False, False), (2, True, True, True)])
def test_neox_hf_to_neox_to_hf_is_identity(tp, pipe, parallel, tied, tmp_path):
    model = hf_model(4, use_parallel_residual=parallel, tie_word_embeddings=tied, **SHAPE)
    src = save_checkpoint(model, tmp_path / "src", "safetensors")
    summary = export_neox(src, tmp_path / "neox", tp=tp, pipe=pipe, verify=True)
    assert summary["verified_tensors"] == 28 - tied and summary["logits_max_abs_diff"] == 0.0
    pattern = "layer_*-model_*-model_states.pt" if pipe else "mp_rank_*_model_states.pt"
    files = tp * (5 - tied) if pipe else tp  # pipeline layers 0, 2, 3, 5 and, untied, the head at 6
    assert len(list((tmp_path / "neox").glob(pattern))) == files
    if pipe:  # Megatron per-rank shapes: qkv rows and dense columns split, dense bias full
        layer = torch.load(tmp_path / "neox" / "layer_02-model_00-model_states.pt", weights_only=True)
        assert layer["attention.query_key_value.weight"].shape == (3 * 64 // tp, 64)
        assert layer["attention.dense.weight"].shape == (64, 64 // tp) and layer["attention.dense.bias"].shape == (64,)
    convert_neox(tmp_path / "neox", tmp_path / "back", verify=True)
    state = hf_state_dict(model)
    if tied:
        del state["embed_out.weight"]  # the head is embed_in itself
    assert_same_tensors(tmp_path / "back", state)
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "back"), model(IDS).logits)


def test_neox_export_casts_dtype_and_refuses_indivisible_tp(model, tmp_path):
    src = save_checkpoint(model, tmp_path / "src", "bin")
    export_neox(src, tmp_path / "neox", tp=2, dtype="bf16", verify=True)
    convert_neox(tmp_path / "neox", tmp_path / "back")
    for name, t in HFCheckpoint(tmp_path / "back").tensors():
        assert t.dtype == torch.bfloat16 and torch.equal(t, hf_state_dict(model)[name].bfloat16()), name
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not divisible by the tensor-parallel degree 8"):
        export_neox(src, tmp_path / "neox8", tp=8)
    assert not (tmp_path / "neox8").exists()
    with pytest.raises(FileExistsError, match="pass force=True to replace it"):
        export_neox(src, tmp_path / "neox", tp=2)


# ------------------------------------------------------------------------------------------------ destinations
def contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("direction", ["neox -> hf", "hf -> neox"])
@pytest.mark.parametrize("where, message", [("parent", "contains the source"), ("inside", "lies inside the source"),
                                            ("same", "is the source")])
def test_neox_conversions_refuse_a_destination_overlapping_the_source(direction, where, message, model, tmp_path):
    parent = tmp_path / "parent"
    if direction == "neox -> hf":
        src, convert = synthesize_neox(hf_state_dict(model), parent / "global_step0", tp=2), convert_neox
    else:
        src, convert = save_checkpoint(model, parent / "hf", "safetensors"), export_neox
    (parent / "notes.txt").write_text("beside the source")
    before = contents(tmp_path)
    dst = {"parent": parent, "inside": src / "out", "same": src}[where]
    with pytest.raises(ValueError, match=f"the destination {dst} {message} {src}"):
        convert(src, dst, force=True)
    assert contents(tmp_path) == before


def test_neox_export_force_replaces_only_an_earlier_export(model, tmp_path):
    src = save_checkpoint(model, tmp_path / "src", "safetensors")
    dst = tmp_path / "neox"
    export_neox(src, dst, tp=2)
    export_neox(src, dst, tp=1, pipe=False, force=True)  # an earlier export: replaced
    assert sorted(p.name for p in dst.iterdir()) == [".gptneox-manifest.json", "configs", "generation_config.json",
                                                     "mp_rank_00_model_states.pt"]
    (dst / "configs" / "mine.yml").write_text("{}")
    (dst / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"training state")
    before = contents(dst)
    with pytest.raises(FileExistsError, match=r"neox holds configs/, zero_pp_rank_0_mp_rank_00_optim_states.pt, not "
                                              r"written by convert_weights.py \(or changed since\)"):
        export_neox(src, dst, tp=2, force=True)
    assert contents(dst) == before
    export_neox(src, tmp_path / "neox2", tp=1)
    convert_hf(src, tmp_path / "neox2", force=True)  # a conversion's output, whichever way: --force replaces it
    assert (tmp_path / "neox2" / "model.safetensors").exists() and not (tmp_path / "neox2" / "configs").exists()


def test_neox_round_trip_carries_the_tokenizer_and_sample_py_runs_on_the_result(shared_data, tmp_path, monkeypatch):
    """HF -> neox -> HF from the command line: tokenizer, generation config and pipeline code travel both ways."""
    src = checkpoint_with_tokenizer(tmp_path / "src", Path(shared_data) / "pythia-tokenizer.json", vocab_size=50304,
                                    max_position_embeddings=256)
    (src / "instruct_pipeline.py").write_text("# Dolly's custom pipeline\n")
    assert _cli(monkeypatch, src, tmp_path / "neox", "--to", "neox", "--tp", "2") == 0
    assert _cli(monkeypatch, tmp_path / "neox", tmp_path / "back", "--verify") == 0
    for name in ("tokenizer.json", "generation_config.json", "instruct_pipeline.py"):
        assert (tmp_path / "neox" / name).read_bytes() == (tmp_path / "back" / name).read_bytes() == \
            (src / name).read_bytes(), name
    tok = Tokenizer.from_pretrained(tmp_path / "back")  # what sample.py does
    assert tok.encode("My favorite food is") == [3220, 7583, 2739, 310]
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "back"), "--prompt", "Hi",
                          "--max-new-tokens", "2", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_neox_refused_export_creates_nothing(tmp_path, monkeypatch, capsys):
    src = save_checkpoint(hf_model(0), tmp_path / "src", "safetensors")  # vocab 101: TP 2 cannot split it
    capsys.readouterr()
    assert _cli(monkeypatch, src, tmp_path / "out" / "neox", "--to", "neox", "--tp", "2") == 1
    assert capsys.readouterr().err == ("convert_weights.py: error: vocab_size = 101 is not divisible by the "
                                       "tensor-parallel degree 2\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # not even out/


def _cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["convert_weights.py", *map(str, args)])
    try:
        runpy.run_path(str(ROOT / "convert_weights.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_neox_command_line_round_trip_with_underscore_spellings(model, tmp_path, monkeypatch, capsys):
    src = save_checkpoint(model, tmp_path / "src", "safetensors")
    assert _cli(monkeypatch, src, tmp_path / "neox", "--to", "neox", "--tp", "2", "--no_pipe", "--verify") == 0
    assert "writing: 100%" in capsys.readouterr().err  # the bar, on by default
    (tmp_path / "neox" / "configs" / "model.yml").rename(tmp_path / "model.yml")
    assert _cli(monkeypatch, tmp_path / "neox", tmp_path / "back", "--neox_config", tmp_path / "model.yml",
                "--trust_pickle", "--quiet") == 0
    assert_same_tensors(tmp_path / "back", hf_state_dict(model))
    assert _cli(monkeypatch, tmp_path / "neox", tmp_path / "again", "--to", "neox") == 2  # a usage error
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "--to neox needs a Hugging Face source" in err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------- bad NeoX input
@pytest.fixture
def neox_src(model, tmp_path):
    return synthesize_neox(hf_state_dict(model), tmp_path / "global_step0", tp=2)


def _set_yml(src, text):
    (src / "configs" / "pythia-tiny.yml").write_text(text)


@pytest.mark.parametrize("edit, message", [
    (('"hidden-size": 64', '"hidden-size": 32'), r"layer_00-model_00.*word_embeddings.weight has shape \[52, 64\], "
                                                  r"but the NeoX config .* implies \[52, 32\].*check hidden-size"),
    (('"hidden-size": 64,', '"hidden-size": 64, "intermediate-size": 128,'),
     r"mlp.dense_h_to_4h.weight has shape \[128, 64\].*implies \[64, 64\].*check hidden-size, intermediate-size"),
    (('"num-layers": 2', '"num-layers": 3'), r"do not fit the NeoX config's num-layers=3"),
    (('"num-attention-heads": 4', '"num-attention-heads": 2'), r"inv_freq has 2 entries.*check num-attention-heads"),
    (('"model-parallel-size": 2', '"model-parallel-size": 4'), r"model-parallel-size is 4, but .* holds 2"),
    (('"gpt-j-residual": true', '"gpt-j-residual": true, "gpt-j-tied": true'), r"unsupported.*gpt-j-tied"),
    (('"pos-emb": "rotary"', '"pos-emb": "alibi"'), r"unsupported gpt-neox variant: pos-emb 'alibi'"),
    (('"num-layers": 2,', '"num-layers": 2'), r"pythia-tiny.yml: line 5 column \d+ not valid YAML"),
])
def test_neox_rejects_config_that_disagrees_with_tensors(edit, message, neox_src, tmp_path):
    _set_yml(neox_src, (PYTHIA_YML % {"tp": 2}).replace(*edit))
    with pytest.raises(CheckpointError, match=message):
        convert_neox(neox_src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["global_step0"]


def test_neox_rejects_missing_rank_file(neox_src, tmp_path):
    (neox_src / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="layer_03-model_01-model_states.pt: missing"):
        convert_neox(neox_src, tmp_path / "hf")


def test_neox_rejects_truncated_file(neox_src, tmp_path):
    file = neox_src / "layer_02-model_01-model_states.pt"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="layer_02-model_01-model_states.pt: corrupt or truncated"):
        convert_neox(neox_src, tmp_path / "hf")


def test_neox_rejects_transformer_engine_layers(neox_src, tmp_path):
    file = neox_src / "layer_02-model_00-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["attention.qkv._extra_state"] = torch.zeros(1)
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="unknown tensor 'attention.qkv._extra_state'.*Transformer Engine"):
        convert_neox(neox_src, tmp_path / "hf")


def test_neox_rejects_pickled_objects_unless_trusted(model, tmp_path):
    src = synthesize_neox(hf_state_dict(model), tmp_path / "global_step0", tp=1, pipe=False)
    file = src / "mp_rank_00_model_states.pt"
    state = torch.load(file, weights_only=True)
    state["args"] = Path("engine-state")  # DeepSpeed keeps Python objects next to the weights
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        convert_neox(src, tmp_path / "hf")
    convert_neox(src, tmp_path / "hf", trust_pickle=True, verify=True)


def test_neox_rejects_directory_without_config_or_ranks(neox_src, tmp_path):
    shutil.rmtree(neox_src / "configs")
    with pytest.raises(CheckpointError, match="no gpt-neox YAML config.*--neox-config"):
        convert_neox(neox_src, tmp_path / "hf")
    for f in neox_src.glob("*model_01-model_states.pt"):
        f.rename(f.with_name(f.name.replace("model_01", "model_02")))
    with pytest.raises(CheckpointError, match=r"ranks \[0, 2\] are not 0..1"):
        convert_neox(neox_src, tmp_path / "hf")
