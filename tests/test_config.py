"""Config: presets against the published shapes, config.json of every transformers era, refusals."""

import json

import pytest
from tiny import hf_config

from gptneox import PRESETS, Config

# docs/architecture.md, "Presets": (layers, hidden, heads, vocab, parameters as Pythia publishes them)
PUBLISHED = {
    "pythia-14m": (6, 128, 4, 50304, 14_067_712),
    "pythia-31m": (6, 256, 8, 50304, 30_494_720),
    "pythia-70m": (6, 512, 8, 50304, 70_426_624),
    "pythia-160m": (12, 768, 12, 50304, 162_322_944),
    "pythia-410m": (24, 1024, 16, 50304, 405_334_016),
    "pythia-1b": (16, 2048, 8, 50304, 1_011_781_632),
    "pythia-1.4b": (24, 2048, 16, 50304, 1_414_647_808),
    "pythia-2.8b": (32, 2560, 32, 50304, 2_775_208_960),
    "pythia-6.9b": (32, 4096, 32, 50432, 6_857_302_016),
    "pythia-12b": (36, 5120, 40, 50688, 11_846_072_320),
    "dolly-v2-3b": (32, 2560, 32, 50280, 2_775_086_080),
    "dolly-v2-7b": (32, 4096, 32, 50280, 6_856_056_832),
    "dolly-v2-12b": (36, 5120, 40, 50280, 11_841_894_400),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_config_preset_matches_published_shapes(name):
    layers, hidden, heads, vocab, params = PUBLISHED[name]
    for n in [name, f"{name}-deduped"] if name.startswith("pythia") else [name]:
        c = Config.from_name(n)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size) == (layers, hidden, heads, vocab)
        assert c.num_parameters == params
        assert c.intermediate_size == 4 * hidden and c.rotary_ndims == c.head_size // 4
        assert c.eos_token_id == 0 and c.bos_token_id == 0 and c.use_parallel_residual and not c.tie_word_embeddings
        assert c.max_position_embeddings == 2048 and c.name == n


def test_config_preset_names_are_exact():
    assert Config.from_name("EleutherAI/pythia-1.4b-deduped") == Config.from_name("pythia-1.4b-deduped")
    assert Config.from_name("databricks/dolly-v2-12b").vocab_size == 50280
    assert len(PRESETS) == 23
    for bad in ["pythia-1.4B", "pythia", "EleutherAI/dolly-v2-3b", "dolly-v2-12b ", "gpt2"]:
        with pytest.raises(ValueError, match="unknown model name .*known names: pythia-14m, pythia-31m"):
            Config.from_name(bad)


def test_config_from_name_takes_overrides():
    assert Config.from_name("pythia-70m", max_position_embeddings=4096).max_position_embeddings == 4096


OLD = {"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 512, "num_hidden_layers": 6,
       "num_attention_heads": 8, "intermediate_size": 2048, "hidden_act": "gelu", "rotary_pct": 0.25,
       "rotary_emb_base": 10000, "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "bos_token_id": 0,
       "eos_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0"}


def test_config_reads_every_transformers_era():
    era_421 = dict(OLD)  # no use_parallel_residual: parallel
    era_448 = {**OLD, "partial_rotary_factor": 0.5, "rotary_pct": 0.5, "rope_theta": 500.0, "rotary_emb_base": 500,
               "use_parallel_residual": False, "rope_scaling": None, "attention_bias": True}
    era_5 = {k: v for k, v in OLD.items() if k not in ("rotary_pct", "rotary_emb_base")}
    era_5["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 1.0}
    a, b, c = (Config.from_hf_config(d) for d in (era_421, era_448, era_5))
    assert (a.rotary_pct, a.rotary_emb_base, a.use_parallel_residual, a.attention_bias) == (0.25, 10000.0, True, True)
    assert (b.rotary_pct, b.rotary_emb_base, b.use_parallel_residual) == (0.5, 500.0, False)
    assert (c.rotary_pct, c.rotary_emb_base, c.rotary_ndims) == (1.0, 20000.0, 64)


def test_config_never_falls_back_to_eos_2():
    missing = {k: v for k, v in OLD.items() if k not in ("eos_token_id", "bos_token_id")}
    assert Config.from_hf_config(missing).eos_token_id == 0
    assert Config.from_hf_config({**OLD, "eos_token_id": None}).eos_token_id == 0
    assert Config.from_hf_config({**OLD, "eos_token_id": [0, 50277]}).eos_token_ids == (0, 50277)


def test_config_reads_transformers_5_config_json(tmp_path):
    hf_config(rotary_pct=0.5, rotary_emb_base=1234).save_pretrained(tmp_path)
    c = Config.from_hf_config(tmp_path)  # a directory
    assert (c.rotary_pct, c.rotary_emb_base, c.vocab_size) == (0.5, 1234.0, 101)
    assert Config.from_hf_config(tmp_path / "config.json") == c  # a file


def test_config_round_trips_through_transformers():
    from transformers import GPTNeoXConfig
    for name in ["pythia-70m", "pythia-2.8b", "dolly-v2-12b"]:
        ours = Config.from_name(name).replace(rotary_pct=0.5, rotary_emb_base=777.0, use_parallel_residual=False)
        hf = GPTNeoXConfig.from_dict(ours.to_hf_config())
        assert hf.rope_parameters["partial_rotary_factor"] == 0.5 and hf.rope_parameters["rope_theta"] == 777.0
        assert (hf.vocab_size, hf.num_hidden_layers, hf.use_parallel_residual, hf.eos_token_id) == \
            (ours.vocab_size, ours.num_hidden_layers, False, 0)
        assert Config.from_hf_config(hf.to_dict()) == ours.replace(name=None)
        assert Config.from_hf_config(ours.to_hf_config()) == ours.replace(name=None)


@pytest.mark.parametrize("change", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
], ids=["linear", "dynamic", "yarn"])
def test_config_refuses_rope_scaling(change):
    with pytest.raises(ValueError, match="RoPE scaling type .* not implemented"):
        Config.from_hf_config({**OLD, **change})


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": 100}, "hidden_size .100. must be divisible by num_attention_heads .8."),
    ({"rotary_pct": 0.3}, "rotary_ndims .* must be even"),
    ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"hidden_size": "512"}, "hidden_size must be a positive integer"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object or null"),
    ({"head_dim": 128}, "head_dim 128 differs from hidden_size / num_attention_heads"),
])
def test_config_rejects_bad_fields(change, message):
    with pytest.raises(ValueError, match=message):
        Config.from_hf_config({**OLD, **change})


def test_config_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/config.json"):
        Config.from_hf_config(tmp_path / "nowhere" / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: not a valid JSON"):
        Config.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: expected a JSON object"):
        Config.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**OLD, "hidden_act": "mish"}))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: hidden_act"):
        Config.from_hf_config(tmp_path)
