"""GPT-NeoX in plain PyTorch: the architecture of Pythia and Dolly v2, numerically HF's GPTNeoXForCausalLM.

Parameter names are the checkpoints' own (gpt_neox.layers.N.attention.query_key_value.weight, embed_out.weight),
so a Pythia or Dolly file loads with no per-tensor transformation. Notation: B batch, T tokens, C hidden_size,
nh heads, hs head size, S keys seen by attention. How each backend computes rotary and attention is ops/'s business
(ops/dispatch.py). Facts: docs/architecture.md, "Forward pass"; where this file sits: docs/architecture.md, "Layers".
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hooks, ops
from .checkpoint import load_pretrained, save_pretrained
from .config import Config
from .generation.generator import generate
from .lora.adapter import load_adapter


class KVCache(nn.Module):
    """A layer's static cache of keys (after rotary) and values, [B, nh, max_len, hs], written at input_pos."""

    in_place = True  # update() writes k_cache[:, :, input_pos] = k: ops may write there directly (ops/dispatch.py)

    def __init__(self, B, nh, max_len, hs, dtype=None, device=None):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(B, nh, max_len, hs, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(B, nh, max_len, hs, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos, k, v):  # input_pos [T]; k, v [B, nh, T, hs] -> the whole cache [B, nh, max_len, hs]
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.hook = None  # hooks.InnerHooks while a hook on q, k, v, scores or pattern of this layer is attached

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        B, T, C = x.shape
        qkv = self.query_key_value(x)  # [B, T, nh * 3 * hs], per head [q | k | v]
        nh, p = self.config.num_attention_heads, self.config.attention_dropout if self.training else 0.0
        q, k, v = ops.qkv_rotary(qkv, nh, rope, cache, input_pos, self.hook)  # q [B, nh, T, hs]; k, v [B, nh, S, hs]
        y = ops.attention(q, k, v, mask, dropout_p=p, hook=self.hook)  # [B, nh, T, hs]
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side: feature h * hs + i
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ops.ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    """One layer. Parallel residual (every Pythia and Dolly model):

        x ──┬── input_layernorm ── attention ──┐
            ├── post_attention_layernorm ── mlp ──┤  out = (mlp + attn) + x, HF's order of summation
            └──────────────────────────────────┘
    Sequential (use_parallel_residual=False): a = x + attn(ln1(x)); out = mlp(ln2(a)) + a.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CausalSelfAttention(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, rope, mask, cache=None, input_pos=None):
        a = self.dropout(self.attention(self.input_layernorm(x), rope, mask, cache, input_pos))
        if self.parallel:
            return self.dropout(self.mlp(self.post_attention_layernorm(x))) + a + x
        a = a + x
        return self.dropout(self.mlp(self.post_attention_layernorm(a))) + a


class GPTNeoX(nn.Module):
    """backend: "eager", "sdpa" or "triton" (ops/runtime.py); None picks ops.default_backend on every forward.
    gradient_checkpointing: in training, recompute each block's activations in backward instead of storing them."""

    def __init__(self, config: Config, backend: str | None = None, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.backend = backend
        self.gradient_checkpointing = gradient_checkpointing
        self.gpt_neox = nn.ModuleDict(dict(
            embed_in=nn.Embedding(config.vocab_size, config.hidden_size),
            emb_dropout=nn.Dropout(config.hidden_dropout),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            final_layer_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied in Pythia / Dolly
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    @property
    def backend(self) -> str:
        """The attention backend: the one set, else "triton" for half precision on CUDA and "sdpa" otherwise."""
        w = self.gpt_neox.embed_in.weight  # the activations' dtype and device (embed_out may hold integers: quantize)
        return self._backend or ops.default_backend(w.device, w.dtype)

    @backend.setter
    def backend(self, name: str | None):
        ops.check_backend(name)
        self._backend = name

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, cache=None, input_pos=None,
                logits_to_keep=0, return_attentions=False):
        """Logits [B, T, vocab_size] for input_ids [B, T].

        position_ids [B, T] or [T]: rotary positions (default: input_pos, else 0..T-1).
        attention_mask [B, S]: 1 for real tokens, 0 for padding, over the keys attention sees (the T inputs, or the
            cache's max_len slots when a cache is given). Or an ops.Ragged: packed sequences, each at its own cache
            row and columns (the serving engine's steps; gptneox/ops/ragged.py).
        cache, input_pos: a list of KVCache from new_cache() and the slots [T] that these tokens fill.
        logits_to_keep: if > 0, logits of the last that many positions only (a prefill needs just the last); a 1-D
            tensor: logits of those positions only (as transformers' logits_to_keep).
        return_attentions: also return the fp32 attention probabilities of every layer, [B, nh, T, S] each (their
            hook points: blocks.{i}.attn.hook_pattern).
        """
        if return_attentions:
            probs = []
            with self.hooks([(lambda name: name.endswith("attn.hook_pattern"), lambda t, name: probs.append(t))]):
                return self(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                            input_pos=input_pos, logits_to_keep=logits_to_keep), probs
        B, T = input_ids.shape
        c, backend = self.config, self.backend
        input_pos = torch.arange(T, device=input_ids.device) if input_pos is None else input_pos
        rope = ops.Rotary(input_pos if position_ids is None else position_ids, c.rotary_ndims, c.rotary_emb_base,
                          backend)
        mask = ops.Mask(input_pos, attention_mask, B, cache[0].max_len if cache else T, backend)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(input_ids))  # [B, T, C]
        for i, block in enumerate(self.gpt_neox.layers):
            args = (x, rope, mask, cache[i] if cache else None, input_pos)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]  # [B, K, C]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]  # [B, logits_to_keep, C]
        return self.unembed(x)  # [B, T, vocab_size]

    def unembed(self, x):
        """Logits [..., vocab_size] of residual-stream vectors x [..., C]: the final layer norm, then embed_out (the
        logit lens reads any layer's hook_resid_post through it)."""
        return self.embed_out(self.gpt_neox.final_layer_norm(x))

    # ------------------------------------------------------------------------------------- hooks (gptneox/hooks.py)
    def hook_names(self) -> list[str]:
        """Every hook point, TransformerLens' names: hook_embed, blocks.{i}.hook_resid_pre, ...,
        ln_final.hook_normalized."""
        return hooks.hook_names(self.config)

    def hooks(self, fwd_hooks=()):
        """A context manager attaching (name, list of names or predicate, fn) pairs; fn(tensor, name) returns a
        replacement of the same shape and dtype (patching, ablation, steering) or None. Removed on exit, always."""
        return hooks.attached(self, fwd_hooks)

    def run_with_hooks(self, input_ids, *, fwd_hooks=(), **forward_kwargs):
        """Logits of one forward with fwd_hooks attached (see hooks()); forward_kwargs go to forward."""
        with self.hooks(fwd_hooks):
            return self(input_ids, **forward_kwargs)

    def run_with_cache(self, input_ids, *, names_filter=None, incl_bwd=False, device=None, **forward_kwargs):
        """(logits, cache): cache[name] is the activation at each hook point names_filter picks (None: all; a name, a
        list of names or a predicate), detached, on `device` (default: where it was computed). incl_bwd: a later
        backward() from a loss on these logits fills cache[name + "_grad"] (as TransformerLens does)."""
        return hooks.run_with_cache(self, input_ids, names_filter=names_filter, incl_bwd=incl_bwd, device=device,
                                    **forward_kwargs)

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype=None, device=None) -> list[KVCache]:
        """One empty KVCache per layer, [B, nh, max_len, hs], in the model's dtype and device by default."""
        c, w = self.config, self.gpt_neox.embed_in.weight
        max_len = max_len or c.max_position_embeddings
        return [KVCache(batch_size, c.num_attention_heads, max_len, c.head_size, dtype or w.dtype, device or w.device)
                for _ in range(c.num_hidden_layers)]

    @torch.no_grad()
    def init_weights(self):
        """gpt-neox's init for training from scratch (Pythia configs: init_method small_init, output wang_init).

        small_init (Nguyen & Salazar 2019): N(0, sqrt(2 / (5 C))) for embeddings and input projections;
        wang_init (Wang 2021, GPT-J): N(0, 2 / (L sqrt(C))) for the projections that feed the residual stream
        (attention.dense, mlp.dense_4h_to_h); biases 0, LayerNorms 1 and 0 (gpt-neox megatron/model/init_functions.py).
        """
        C, L = self.config.hidden_size, self.config.num_hidden_layers
        small, wang = math.sqrt(2 / (5 * C)), 2 / (L * math.sqrt(C))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = wang if name.endswith(("attention.dense", "mlp.dense_4h_to_h")) else small
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def resize_token_embeddings(self, n: int) -> None:
        """HF's resize_token_embeddings(n), in place: rows past n are cut (Pythia's padded 50304 -> Dolly's 50280),
        new rows start at the mean of the old ones (HF's mean_resizing); config.vocab_size follows."""
        old = self.config.vocab_size
        if n == old:
            return
        quantized = hasattr(self.embed_out, "keep_rows")  # int8 / int4 (gptneox.quant): its rows can only be cut
        if quantized:
            self.embed_out.keep_rows(n)
        for module in (self.gpt_neox.embed_in,) if quantized else (self.gpt_neox.embed_in, self.embed_out):
            w = module.weight  # [old, C]
            w = w[:n] if n < old else torch.cat([w, w.mean(0, keepdim=True).expand(n - old, -1)])
            module.weight = nn.Parameter(w.clone())
        self.gpt_neox.embed_in.num_embeddings = self.embed_out.out_features = n
        self.config = self.config.replace(vocab_size=n)
        if self.config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, device=None, dtype=None, backend=None,
                        progress=False, quantize=None, group_size=128, adapter=None) -> "GPTNeoX":
        """Load an HF-layout checkpoint (safetensors or .bin, single or sharded; see checkpoint.py) from a directory,
        or from a model name found locally or fetched like sample.py --ckpt: "EleutherAI/pythia-70m@step3000", or
        the name with revision="step3000" (see hub.py). quantize="int8" / "int4" (with group_size): weight-only
        quantization while streaming (gptneox/quant/); a quantized checkpoint loads quantized by itself.
        adapter: a LoRA adapter directory (ours or PEFT's) to attach, after quantization (QLoRA), the embeddings
        resized to the vocabulary it was trained with (lora.load_adapter)."""
        model = load_pretrained(cls, name_or_path, revision=revision, device=device, dtype=dtype, backend=backend,
                                progress=progress, quantize=quantize, group_size=group_size)
        if adapter is not None:
            load_adapter(model, adapter, resize_embeddings=True)
        return model

    def generate(self, input_ids, **kwargs):
        """Generated token ids for prompts input_ids; the options are gptneox.generation.generate's."""
        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, path, *, max_shard_size="5GB", tokenizer=None, progress=False, force=False) -> None:
        """Write config.json and safetensors (+ index when sharded) that transformers loads, and tokenizer.json if a
        Tokenizer is given; atomic: the directory is replaced whole, a user's other files in it are kept. A
        checkpoint already there is replaced only with force=True, and only if gptneox wrote it and it is unchanged."""
        save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer, progress=progress,
                        force=force)


def causal_lm_loss(logits, labels, ignore_index=-100, reduction="mean"):
    """HF's causal LM loss: predict labels[:, t+1] from logits[:, t], fp32 cross-entropy over the kept tokens,
    their mean (HF) or, with reduction="sum", their sum (to normalise a batch split into micro-batches)."""
    logits = logits[:, :-1].float().flatten(0, 1)  # [B * (T-1), vocab]
    return F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=ignore_index, reduction=reduction)
