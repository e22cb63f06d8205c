"""Tiny random Hugging Face GPT-NeoX models, and checkpoints of them in every published on-disk form.

No network: every test model is built here from GPTNeoXConfig. transformers 5 writes safetensors only, so the
pickle forms (.bin, sharded .bin, the transformers-4.2x file with stale buffers and old config keys) are written
the way transformers 4.x wrote them: torch.save of the state dict, HF's shard names and index format.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch

from gptneox import Config, GPTNeoX

warnings.filterwarnings("ignore", module="transformers")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

FORMS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded", "bin-old")


def hf_config(**overrides) -> GPTNeoXConfig:
    kw = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
              rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=128, use_parallel_residual=True,
              bos_token_id=0, eos_token_id=0, hidden_act="gelu")
    kw.update(overrides)
    config = GPTNeoXConfig(**kw)
    config._attn_implementation = "eager"
    return config


def hf_model(seed=0, **overrides) -> GPTNeoXForCausalLM:
    """A random model whose every parameter (LayerNorms and biases included) differs from its init value."""
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "layernorm" in name or "layer_norm" in name else 0.05)
                    + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def hf_state_dict(model) -> dict:
    """The state dict as transformers 4.x names it on disk (embed_out.weight, not lm_head.weight)."""
    return {("embed_out.weight" if k == "lm_head.weight" else k): v.detach().clone()
            for k, v in model.state_dict().items()}


def checkpoint_with_tokenizer(path, tokenizer_file, seed: int = 0, **config) -> Path:
    """A tiny random checkpoint (safetensors) in directory path with a real tokenizer.json copied beside it."""
    path = save_checkpoint(hf_model(seed, **config), path, "safetensors")
    shutil.copy(tokenizer_file, Path(path) / "tokenizer.json")
    return path


def save_checkpoint(model, path, form: str) -> Path:
    """Write model to directory path in one of FORMS; returns the path."""
    path = Path(path)
    if form == "safetensors":
        model.save_pretrained(path)
    elif form == "safetensors-sharded":
        model.save_pretrained(path, max_shard_size="20KB")
    elif form in ("bin", "bin-sharded"):
        path.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(path / "config.json")
        _save_bin(hf_state_dict(model), path, shards=3 if form == "bin-sharded" else 1)
    elif form == "bin-old":
        _save_old(model, path)
    else:
        raise ValueError(form)
    return path


def _save_bin(state, path, shards):
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names = list(state)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, path / file)
        weight_map.update({k: file for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def _save_old(model, path):
    """A transformers-4.24-era Pythia file: fp16, old config keys, persistent mask / masked_bias / inv_freq."""
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    rot = int(c.hidden_size // c.num_attention_heads * c.rope_parameters["partial_rotary_factor"])
    config = dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", vocab_size=c.vocab_size,
                  hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                  num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                  hidden_act=c.hidden_act, rotary_pct=c.rope_parameters["partial_rotary_factor"],
                  rotary_emb_base=c.rope_parameters["rope_theta"], max_position_embeddings=c.max_position_embeddings,
                  initializer_range=0.02, layer_norm_eps=c.layer_norm_eps, use_cache=True, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=False, torch_dtype="float16", transformers_version="4.24.0")
    assert c.use_parallel_residual, "the old config has no use_parallel_residual key: it means parallel"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.half() for k, v in hf_state_dict(model).items()}
    n = c.max_position_embeddings
    inv_freq = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
    for i in range(c.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8))[None, None]
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.half()
    torch.save(state, path / "pytorch_model.bin")


class Scripted(GPTNeoX):
    """A model that writes `script` whatever it is fed: its logits at a token of position p (position_ids when
    given, else input_pos) put script[p] first, at every position of a chunk, in every row (logits_to_keep honoured)."""

    def __init__(self, script, vocab_size=50304, max_position_embeddings=256):
        super().__init__(Config(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                intermediate_size=8, max_position_embeddings=max_position_embeddings))
        self.script = script

    def forward(self, input_ids, *, position_ids=None, input_pos=None, **kwargs):
        B, T = input_ids.shape
        pos = input_pos[None].expand(B, -1) if position_ids is None else position_ids  # [B, T]
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.script[min(int(pos[b, t]), len(self.script) - 1)]] = 100.0
        keep = kwargs.get("logits_to_keep", 0)  # as GPTNeoX.forward: positions, or the last that many
        return logits[:, keep] if isinstance(keep, torch.Tensor) else logits[:, -keep:] if keep else logits
