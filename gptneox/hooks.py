"""Hook points with TransformerLens' names on the exact model: read, cache, patch or ablate any activation.

    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))
    logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.3.attn.hook_z", zero_head_5)])   # fn(tensor, name)
    with model.hooks(fwd_hooks=[(lambda name: "hook_pattern" in name, show)]): model(ids)

Most points are the input or output of a module the model already has (blocks.{i}.hook_resid_pre is the input of
gpt_neox.layers.{i}, ln_final.hook_normalized the output of gpt_neox.final_layer_norm, ...) and are reached with
PyTorch's own module hooks. The others live inside attention (q, k, v before and after rotary, the scores and the
pattern): a hooked layer hands ops.qkv_rotary and ops.attention an InnerHooks, and ops runs that layer's step in
torch (the split and rotary for q, k and v hooks; explicit attention for scores and pattern hooks; the fused kernels
never materialise probabilities); every other layer and every other hook keeps the fast path. With no hook
registered nothing here runs: the forward is the plain one, bit for bit. Shapes are TransformerLens': q, k, v, z
[B, T, nh, hs], scores and pattern [B, nh, T, S], the rest [B, T, C] or [B, T, 4C].
"""

import difflib
from contextlib import contextmanager

import torch

# name (with {i} for the layer) -> (module path, which tensor of it, view for the user). "normalized" is a LayerNorm's
# (x - mean) / sqrt(var + eps) before its weight and bias, as TransformerLens 4 hooks it (and as a fold_ln model's
# LayerNorm outputs it); "inner" points are inside attention.
POINTS = {
    "hook_embed": ("gpt_neox.embed_in", "output", None),
    "blocks.{i}.hook_resid_pre": ("gpt_neox.layers.{i}", "input", None),
    "blocks.{i}.ln1.hook_normalized": ("gpt_neox.layers.{i}.input_layernorm", "normalized", None),
    "blocks.{i}.attn.hook_q": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_k": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_v": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_rot_q": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_rot_k": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_attn_scores": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_pattern": ("gpt_neox.layers.{i}.attention", "inner", None),
    "blocks.{i}.attn.hook_z": ("gpt_neox.layers.{i}.attention.dense", "input", "heads"),
    "blocks.{i}.hook_attn_out": ("gpt_neox.layers.{i}.attention", "output", None),
    "blocks.{i}.hook_resid_mid": ("gpt_neox.layers.{i}.post_attention_layernorm", "input", None),  # sequential only
    "blocks.{i}.ln2.hook_normalized": ("gpt_neox.layers.{i}.post_attention_layernorm", "normalized", None),
    "blocks.{i}.mlp.hook_pre": ("gpt_neox.layers.{i}.mlp.dense_h_to_4h", "output", None),
    "blocks.{i}.mlp.hook_post": ("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "input", None),
    "blocks.{i}.hook_mlp_out": ("gpt_neox.layers.{i}.mlp", "output", None),
    "blocks.{i}.hook_resid_post": ("gpt_neox.layers.{i}", "output", None),
    "ln_final.hook_normalized": ("gpt_neox.final_layer_norm", "normalized", None),
}
# inner points whose tensors ops holds as [B, nh, T, hs]; the user sees TransformerLens' [B, T, nh, hs]
HEAD_MAJOR = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k")


def hook_names(config) -> list[str]:
    """Every hook point of a model with this config, in the order a forward reaches them."""
    names = []
    for template in POINTS:
        if "{i}" not in template:
            names.append(template)
            continue
        if template.endswith("hook_resid_mid") and config.use_parallel_residual:
            continue  # parallel residual: both layer norms read resid_pre, there is no resid_mid
        names += [template.format(i=i) for i in range(config.num_hidden_layers)]
    names.sort(key=lambda n: (n != "hook_embed", n == "ln_final.hook_normalized", _layer(n), _order(n)))
    return names


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blocks.") else -1


def _order(name: str) -> int:
    template = name if not name.startswith("blocks.") else "blocks.{i}." + name.split(".", 2)[2]
    return list(POINTS).index(template)


def select(model, name_or_predicate) -> list[str]:
    """The hook names a name (checked, with close matches on a typo), a list of names or a predicate picks."""
    names = hook_names(model.config)
    if callable(name_or_predicate):
        return [n for n in names if name_or_predicate(n)]
    wanted = [name_or_predicate] if isinstance(name_or_predicate, str) else list(name_or_predicate)
    for name in wanted:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; model.hook_names() lists them"
            raise ValueError(f"unknown hook point {name!r}{hint}")
    return wanted


def _checked(name: str, fn, tensor: torch.Tensor) -> torch.Tensor:
    """fn(tensor, name), or tensor when fn returns None; a replacement must keep shape, dtype and device."""
    out = fn(tensor, name)
    if out is None:
        return tensor
    if not isinstance(out, torch.Tensor) or (out.shape, out.dtype, out.device) != (tensor.shape, tensor.dtype,
                                                                                      tensor.device):
        got = (list(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"hook {name}: the function returned {got}, expected a tensor of "
                         f"{[list(tensor.shape), tensor.dtype, tensor.device]} (or None to keep the value)")
    return out


class InnerHooks:
    """A hooked attention layer's functions for its inner points, by short name ("hook_q", "hook_pattern", ...).
    ops calls it at every inner point of that layer; a point without a function passes its tensor through."""

    def __init__(self, layer: int, nh: int):
        self.layer, self.nh, self.fns = layer, nh, {}

    def __contains__(self, short: str) -> bool:
        return short in self.fns

    def __call__(self, short: str, tensor: torch.Tensor) -> torch.Tensor:
        fns = self.fns.get(short)
        if not fns:
            return tensor
        name = f"blocks.{self.layer}.attn.{short}"
        view = tensor.transpose(1, 2) if short in HEAD_MAJOR else tensor  # [B, nh, T, hs] -> [B, T, nh, hs]
        for fn in fns:
            view = _checked(name, fn, view)
        return view.transpose(1, 2) if short in HEAD_MAJOR else view


@contextmanager
def attached(model, fwd_hooks):
    """Attach (name or list of names or predicate, fn) pairs for the duration of the block; always detached after,
    even on an error. fn(tensor, name) returns a replacement (same shape and dtype) or None."""
    handles, hooked = [], []
    try:
        for target, fn in fwd_hooks:
            for name in select(model, target):
                _attach(model, name, fn, handles, hooked)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attention in hooked:
            attention.hook = None


def _attach(model, name, fn, handles, hooked):
    i = _layer(name)
    template = name if i < 0 else name.replace(f"blocks.{i}.", "blocks.{i}.", 1)
    path, where, view = POINTS[template]
    module = model.get_submodule(path.format(i=i))
    if where == "inner":
        if module.hook is None:
            module.hook = InnerHooks(i, model.config.num_attention_heads)
            hooked.append(module)
        module.hook.fns.setdefault(name.rsplit(".", 1)[1], []).append(fn)
        return
    nh = model.config.num_attention_heads
    to_user = (lambda t: t.unflatten(-1, (nh, -1))) if view == "heads" else (lambda t: t)  # [B, T, C] -> [B, T, nh, hs]
    to_model = (lambda t: t.flatten(-2)) if view == "heads" else (lambda t: t)

    def call(t):
        return to_model(_checked(name, fn, to_user(t)))
    if where == "output":
        handles.append(module.register_forward_hook(lambda m, args, out: call(out)))
    elif where == "input":
        handles.append(module.register_forward_pre_hook(lambda m, args: (call(args[0]), *args[1:])))
    else:
        handles.append(module.register_forward_hook(lambda m, args, out: _normalized(m, args[0], out, call)))


def _normalized(ln, x, out, call):
    """A LayerNorm's output after `call` on its normalized input: the module's own output when the value comes back
    unchanged (bit for bit, no new gradient path), else the replacement with the LayerNorm's weight and bias."""
    normalized = torch.nn.functional.layer_norm(x, ln.normalized_shape, None, None, ln.eps)  # [B, T, C]
    new = call(normalized)
    if new is normalized or (not new.requires_grad and torch.equal(new, normalized)):
        return out
    return new * ln.weight + ln.bias


class ActivationCache(dict):
    """name -> activation (detached), and name + "_grad" -> its gradient once a backward pass has run."""

    def __missing__(self, key):
        if key.endswith("_grad") and key[:-5] in self:
            raise KeyError(f"{key}: no gradient yet; run_with_cache(..., incl_bwd=True) fills it when you call "
                           "backward() on a loss computed from the logits it returned")
        raise KeyError(f"{key}: not in the cache (cached: {len(self)} names; see names_filter)")


def run_with_cache(model, input_ids, *, names_filter=None, incl_bwd=False, device=None, **forward_kwargs):
    """(logits, ActivationCache) of one forward; see GPTNeoX.run_with_cache."""
    cache = ActivationCache()
    names = hook_names(model.config) if names_filter is None else select(model, names_filter)
    if incl_bwd and not torch.is_grad_enabled():
        raise ValueError("run_with_cache(incl_bwd=True) records gradients: call it outside torch.no_grad()")

    def store(tensor, name):
        cache[name] = tensor.detach() if device is None else tensor.detach().to(device)
        if incl_bwd and tensor.requires_grad:
            tensor.register_hook(lambda grad: cache.__setitem__(name + "_grad", grad.detach() if device is None
                                                                else grad.detach().to(device)))
    with attached(model, [(names, store)]):
        logits = model(input_ids, **forward_kwargs)
    return logits, cache
