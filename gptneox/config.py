"""GPT-NeoX hyperparameters: the `Config` dataclass, the Pythia / Dolly v2 presets, and HF config.json I/O.

Field names are Hugging Face `GPTNeoXConfig`'s, so a config.json reads as a dict of our fields. This module imports
nothing from torch. Facts and sources: docs/architecture.md, "Config fields" and "Presets".
"""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Activations we implement (the names of HF's ACT2FN table that GPT-NeoX configs use).
ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 50304  # rows of embed_in / embed_out; Pythia pads 50277 tokens to a multiple of 128 x TP
    hidden_size: int = 768  # C
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # nh; always multi-head (no GQA field in GPT-NeoX)
    intermediate_size: int = 3072  # MLP width, 4 x hidden in every Pythia / Dolly model
    hidden_act: str = "gelu"  # HF "gelu" is the exact erf GELU (architecture.md, "Forward pass")
    rotary_pct: float = 0.25  # fraction of each head that is rotated (HF default; gpt-neox's own default is 1.0)
    rotary_emb_base: float = 10000.0  # RoPE theta
    max_position_embeddings: int = 2048  # context length of every Pythia / Dolly model
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: sequential
    attention_bias: bool = True  # bias on query_key_value and attention.dense (MLP biases always exist)
    tie_word_embeddings: bool = False  # Pythia / Dolly: untied (no-weight-tying: true)
    initializer_range: float = 0.02  # HF's init std (we init as gpt-neox does, see GPTNeoX.init_weights)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bos_token_id: int = 0  # <|endoftext|> in the 20B tokenizer; never HF's class default eos 2 ("!")
    eos_token_id: int | tuple[int, ...] = 0
    pad_token_id: int | None = None
    name: str | None = None  # the preset this config came from, if any

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ValueError(
                f"rotary_ndims = int(head_size {self.head_size} * rotary_pct {self.rotary_pct}) = {self.rotary_ndims} "
                "must be even (rotate-half pairs dims i and i + rotary_ndims/2)"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")

    @property
    def head_size(self) -> int:  # hs
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:  # rot: HF's int(head_size * rotary_pct), not rounded
        return int(self.head_size * self.rotary_pct)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def num_parameters(self) -> int:
        C, I, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        attn = 3 * C * C + C * C + (4 * C if self.attention_bias else 0)
        block = attn + 2 * C * I + I + C + 4 * C  # + two LayerNorms
        return V * C * (1 if self.tie_word_embeddings else 2) + L * block + 2 * C

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length seq_len: 6 N + 6 L C T, where N excludes
        the input embedding, a lookup (PaLM appendix B; nanoGPT's estimate_mfu; docs/performance.md)."""
        n = self.num_parameters - self.vocab_size * self.hidden_size
        return 6 * n + 6 * self.num_hidden_layers * self.hidden_size * seq_len

    # ----------------------------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        """A preset by its exact name ("pythia-1.4b", "EleutherAI/pythia-1.4b-deduped", "dolly-v2-12b", ...)."""
        key = HUB_IDS.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(PRESETS)}")
        return cls(name=key, **{**PRESETS[key], **overrides})

    # ---------------------------------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, config) -> "Config":
        """Read a config.json (a dict, a file, or a checkpoint directory) written by any transformers version."""
        source = "config"
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no such config file") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a valid JSON config ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, found {type(config).__name__}")
        if config.get("model_type", "gpt_neox") != "gpt_neox":
            raise ValueError(f"{source}: model_type is {config['model_type']!r}, expected 'gpt_neox'")
        rope = config.get("rope_parameters") or {}
        _refuse_rope_scaling(rope, config.get("rope_scaling"), source)
        heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
        if config.get("head_dim") is not None and heads and hidden and config["head_dim"] != hidden // heads:
            raise ValueError(f"{source}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                             f"({hidden} / {heads}); GPT-NeoX's attention has no separate head size")
        kwargs = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "name"}
        kwargs["rotary_pct"] = _first(rope.get("partial_rotary_factor"), config.get("partial_rotary_factor"),
                                      config.get("rotary_pct"), 0.25)
        kwargs["rotary_emb_base"] = float(_first(rope.get("rope_theta"), config.get("rope_theta"),
                                                 config.get("rotary_emb_base"), 10000.0))
        for key in ("bos_token_id", "eos_token_id"):  # absent or null: the 20B tokenizer's EOD (0), never 2
            if kwargs.get(key) is None:
                kwargs[key] = 0
        if isinstance(kwargs["eos_token_id"], list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        for key in ("use_parallel_residual", "attention_bias"):  # absent before transformers 4.28 / 4.40
            if kwargs.get(key) is None:
                kwargs[key] = True
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """A config.json dict that every transformers era reads (old and new RoPE keys side by side)."""
        d = {k: v for k, v in asdict(self).items() if k != "name"}
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d.update(
            model_type="gpt_neox",
            architectures=["GPTNeoXForCausalLM"],
            partial_rotary_factor=self.rotary_pct,  # 4.48+ names
            rope_theta=self.rotary_emb_base,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rotary_emb_base,
                             "partial_rotary_factor": self.rotary_pct},  # 5.x name
            use_cache=True,
        )
        return d

    def replace(self, **changes) -> "Config":
        return replace(self, **changes)


def _first(*values):
    return next(v for v in values if v is not None)


def _refuse_rope_scaling(rope: dict, rope_scaling, source: str) -> None:
    """A RoPE variant we do not implement changes the math: refuse it rather than approximate."""
    for field, value in (("rope_parameters", rope), ("rope_scaling", rope_scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{source}: {field} must be an object or null, got {value!r}")
    kinds = [rope.get("rope_type", rope.get("type"))]
    if rope_scaling:
        kinds.append(rope_scaling.get("rope_type", rope_scaling.get("type")))
    for kind in kinds:
        if kind not in (None, "default"):
            raise ValueError(f"{source}: RoPE scaling type {kind!r} is not implemented by gptneox "
                             "(only the default rotary embedding); refusing to load rather than approximate")


# ---------------------------------------------------------------------------------------------------- presets
# Shapes from the Pythia README / configs and Dolly's trainer (docs/architecture.md, "Presets").
# All: rotary_pct 0.25, base 10000, 2048 context, parallel residual, untied head, eps 1e-5, bos = eos = 0
# (Pythia *.yml).
def _pythia(L, C, nh, vocab=50304):
    return dict(num_hidden_layers=L, hidden_size=C, num_attention_heads=nh, intermediate_size=4 * C, vocab_size=vocab)


_PYTHIA = {
    "pythia-14m": _pythia(6, 128, 4),  # https://huggingface.co/EleutherAI/pythia-14m/blob/main/config.json
    "pythia-31m": _pythia(6, 256, 8),  # https://huggingface.co/EleutherAI/pythia-31m/blob/main/config.json
    "pythia-70m": _pythia(6, 512, 8),  # https://huggingface.co/EleutherAI/pythia-70m/blob/main/config.json
    "pythia-160m": _pythia(12, 768, 12),  # https://huggingface.co/EleutherAI/pythia-160m/blob/main/config.json
    "pythia-410m": _pythia(24, 1024, 16),  # https://huggingface.co/EleutherAI/pythia-410m/blob/main/config.json
    "pythia-1b": _pythia(16, 2048, 8),  # https://huggingface.co/EleutherAI/pythia-1b/blob/main/config.json (hs 256)
    "pythia-1.4b": _pythia(24, 2048, 16),  # https://huggingface.co/EleutherAI/pythia-1.4b/blob/main/config.json
    "pythia-2.8b": _pythia(32, 2560, 32),  # https://huggingface.co/EleutherAI/pythia-2.8b/blob/main/config.json (hs 80)
    "pythia-6.9b": _pythia(32, 4096, 32, 50432),  # trained at TP 2: vocab padded to 256 (pythia-6.9b/config.json)
    "pythia-12b": _pythia(36, 5120, 40, 50688),  # trained at TP 4: vocab padded to 512 (pythia-12b/config.json)
}
PRESETS = {
    **_PYTHIA,
    **{f"{name}-deduped": cfg for name, cfg in _PYTHIA.items()},  # same shapes, trained on the deduplicated Pile
    # Dolly v2: Pythia + 3 special tokens, resize_token_embeddings(50280) (databrickslabs/dolly training/trainer.py)
    "dolly-v2-3b": {**_PYTHIA["pythia-2.8b"], "vocab_size": 50280},  # https://huggingface.co/databricks/dolly-v2-3b
    "dolly-v2-7b": {**_PYTHIA["pythia-6.9b"], "vocab_size": 50280},  # https://huggingface.co/databricks/dolly-v2-7b
    "dolly-v2-12b": {**_PYTHIA["pythia-12b"], "vocab_size": 50280},  # https://huggingface.co/databricks/dolly-v2-12b
}
# the Hugging Face hub id of each preset: pythia-1.4b -> EleutherAI/pythia-1.4b
HUB_IDS = {f"{'databricks' if n.startswith('dolly') else 'EleutherAI'}/{n}": n for n in PRESETS}
