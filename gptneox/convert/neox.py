"""GPT-NeoX native (DeepSpeed) checkpoints: read a global_stepN directory, merge its tensor-parallel ranks into HF
tensors, and the reverse (split HF tensors into ranks and write them as gpt-neox does).

Layouts (docs/architecture.md, gpt-neox checkpoints and tensor-parallel merging):
    layer_{LL}-model_{RR}-model_states.pt   one plain state dict per pipeline layer LL per TP rank RR
    mp_rank_{RR}_model_states.pt            pipe-parallel-size 0: {"module": {"sequential.{LL}.{param}": tensor}}
Pipeline layer LL: 0 embedding, 2 .. L+1 transformer layers, L+3 final norm, L+4 output head (untied only).
Merge rules (same section): column-parallel tensors concatenate on dim 0, row-parallel weights on dim 1, row-parallel
biases sum (parallel residual; each rank adds its full bias before one all-reduce), replicated LayerNorms average.
Sums and means are taken in float64 and rounded once.
"""

import re
from pathlib import Path

import torch

from .. import progress as progress_bars
from ..checkpoint import CheckpointError
from ..config import Config
from ..model import GPTNeoX

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
MP_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
# per-layer NeoX name -> (HF name inside gpt_neox.layers.N, how tensor parallelism splits it); None: a buffer to skip
LAYER_KEYS = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "input_layernorm.bias": ("input_layernorm.bias", "replicated"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", "replicated"),
    "attention.query_key_value.weight": ("attention.query_key_value.weight", "column"),
    "attention.query_key_value.bias": ("attention.query_key_value.bias", "column"),
    "attention.dense.weight": ("attention.dense.weight", "row"),
    "attention.dense.bias": ("attention.dense.bias", "row_bias"),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", "column"),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", "column"),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", "row"),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", "row_bias"),
    "mlp.linear1.weight": ("mlp.dense_h_to_4h.weight", "column"),  # newer gpt-neox names the MLP linear1 / linear2
    "mlp.linear1.bias": ("mlp.dense_h_to_4h.bias", "column"),
    "mlp.linear2.weight": ("mlp.dense_4h_to_h.weight", "row"),
    "mlp.linear2.bias": ("mlp.dense_4h_to_h.bias", "row_bias"),
    "attention.rotary_emb.inv_freq": None,  # recomputed from the config; its shape is still checked
}
EMBED_KEYS = {"word_embeddings.weight": ("gpt_neox.embed_in.weight", "column")}  # vocab-parallel rows
NORM_KEYS = {"norm.weight": ("gpt_neox.final_layer_norm.weight", "replicated"),
             "norm.bias": ("gpt_neox.final_layer_norm.bias", "replicated")}
HEAD_KEYS = {"final_linear.weight": ("embed_out.weight", "column")}  # output-layer-parallelism: column
TE_MARKERS = ("attention.qkv", "attention.proj", "fc1_weight", "fc2_weight", "_extra_state", "layer_norm_weight")
# config fields that fix each HF tensor's shape, named when a tensor disagrees with the config
SHAPE_FIELDS = {"embed_in": "hidden-size", "query_key_value": "hidden-size", "attention.dense": "hidden-size",
                "dense_h_to_4h": "hidden-size, intermediate-size", "dense_4h_to_h": "hidden-size, intermediate-size",
                "layernorm": "hidden-size", "layer_norm": "hidden-size", "embed_out": "hidden-size"}
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu"}  # gpt-neox `activation` -> HF hidden_act


# ------------------------------------------------------------------------------------------------- NeoX config
def _yaml():
    try:
        import yaml  # optional dependency: only NeoX conversions need it
    except ImportError:
        raise RuntimeError("gpt-neox conversions read and write YAML configs: pip install pyyaml") from None
    return yaml


def read_neox_args(paths) -> tuple[dict, str]:
    """Merge gpt-neox YAML config files (later files win) into one dict with dashed keys, and a source label."""
    yaml = _yaml()

    args = {}
    for path in map(Path, paths):
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: NeoX config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise CheckpointError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a mapping of gpt-neox arguments, found {type(data).__name__}")
        args.update({k.replace("_", "-"): v for k, v in data.items()})  # gpt-neox accepts both spellings
    return args, ", ".join(str(p) for p in paths)


def find_neox_config(ckpt: Path) -> list[Path]:
    """The YAML files gpt-neox saved with a checkpoint (global_stepN/configs/*.yml), or beside its files."""
    for folder in (ckpt / "configs", ckpt):
        found = sorted(p for p in folder.glob("*.y*ml") if p.is_file()) if folder.is_dir() else []
        if found:
            return found
    raise CheckpointError(f"{ckpt}: no gpt-neox YAML config in {ckpt}/configs/ or {ckpt}/; pass it with --neox-config")


def config_from_neox(args: dict, vocab_size: int, source: str = "NeoX config") -> Config:
    """Our Config from gpt-neox arguments (gpt-neox's defaults where a key is absent); refuses variants HF lacks."""
    def unsupported(what):
        raise CheckpointError(f"{source}: unsupported gpt-neox variant: {what}")

    for key in ("num-layers", "hidden-size", "num-attention-heads"):
        if key not in args:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
    if args.get("pos-emb", "learned") != "rotary":
        unsupported(f"pos-emb {args.get('pos-emb', 'learned')!r} (only rotary; gpt-neox's default is learned)")
    if args.get("norm", "layernorm") != "layernorm":
        unsupported(f"norm {args['norm']!r} (only layernorm)")
    if args.get("gpt-j-tied"):
        unsupported("gpt-j-tied: true (one LayerNorm shared by attention and MLP; HF has two)")
    if args.get("num-kv-heads") not in (None, args["num-attention-heads"]):
        unsupported(f"num-kv-heads {args['num-kv-heads']} (grouped-query attention)")
    if args.get("mlp-type", "regular") != "regular":
        unsupported(f"mlp-type {args['mlp-type']!r}")
    if (args.get("moe-num-experts") or 1) > 1:
        unsupported("mixture of experts (moe-num-experts > 1)")
    if args.get("output-layer-parallelism", "column") != "column":
        unsupported(f"output-layer-parallelism {args['output-layer-parallelism']!r}")
    if args.get("use-bias-in-norms", True) is False:
        unsupported("use-bias-in-norms: false")
    activation = args.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        unsupported(f"activation {activation!r} (supported: {', '.join(ACTIVATIONS)})")
    for types, _count in args.get("attention-config") or []:
        for kind in types:
            if kind not in ("global", "flash"):
                unsupported(f"attention type {kind!r} in attention-config (only global / flash attention)")
    H = args["hidden-size"]
    try:
        return Config(
            vocab_size=vocab_size, hidden_size=H, num_hidden_layers=args["num-layers"],
            num_attention_heads=args["num-attention-heads"], intermediate_size=args.get("intermediate-size") or 4 * H,
            hidden_act=ACTIVATIONS[activation], rotary_pct=float(args.get("rotary-pct", 1.0)),  # gpt-neox default 1.0
            rotary_emb_base=float(args.get("rotary-emb-base", 10000)),
            max_position_embeddings=args.get("max-position-embeddings") or args.get("seq-length") or 2048,
            layer_norm_eps=float(args.get("layernorm-epsilon", 1e-5)),
            use_parallel_residual=bool(args.get("gpt-j-residual", False)),
            attention_bias=bool(args.get("use-bias-in-attn-linear", True)),
            tie_word_embeddings=not args.get("no-weight-tying", False),
            bos_token_id=0, eos_token_id=0)  # the 20B tokenizer's <|endoftext|>, as Pythia's configs say
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def neox_args_from_config(config: Config, tp: int, pipe: bool, dtype: torch.dtype) -> dict:
    """The gpt-neox arguments that describe config (the reverse of config_from_neox)."""
    args = {
        "num-layers": config.num_hidden_layers, "hidden-size": config.hidden_size,
        "num-attention-heads": config.num_attention_heads, "intermediate-size": config.intermediate_size,
        "seq-length": config.max_position_embeddings, "max-position-embeddings": config.max_position_embeddings,
        "pos-emb": "rotary", "rotary-pct": config.rotary_pct, "rotary-emb-base": config.rotary_emb_base,
        "norm": "layernorm", "layernorm-epsilon": config.layer_norm_eps, "activation": config.hidden_act,
        "gpt-j-residual": config.use_parallel_residual, "gpt-j-tied": False,
        "no-weight-tying": not config.tie_word_embeddings, "output-layer-parallelism": "column",
        "use-bias-in-attn-linear": config.attention_bias,
        "attention-config": [[["global"], config.num_hidden_layers]],
        "model-parallel-size": tp, "pipe-parallel-size": 1 if pipe else 0,
    }
    if dtype == torch.float16:
        args["fp16"] = {"enabled": True}
    elif dtype == torch.bfloat16:
        args["bf16"] = {"enabled": True}
    return args


# ---------------------------------------------------------------------------------------------- merge / split
def merge(kind: str, parts: list[torch.Tensor], parallel_residual: bool) -> torch.Tensor:
    """One HF tensor from its per-rank pieces, by the rules of docs/architecture.md, "gpt-neox checkpoints and
    tensor-parallel merging"."""
    if kind == "column":
        return torch.cat(parts, dim=0)
    if kind == "row":
        return torch.cat(parts, dim=1)
    stacked = torch.stack([p.double() for p in parts])  # [tp, ...]
    if kind == "row_bias" and parallel_residual:
        return stacked.sum(0).to(parts[0].dtype)  # every rank adds its full bias before one all-reduce
    return stacked.mean(0).to(parts[0].dtype)  # replicated: equal up to drift; average


def split(kind: str, tensor: torch.Tensor, tp: int, parallel_residual: bool) -> list[torch.Tensor]:
    """The per-rank pieces of one HF tensor; merge(kind, split(kind, t)) == t exactly."""
    if kind == "column":
        return [p.clone() for p in tensor.chunk(tp, dim=0)]
    if kind == "row":
        return [p.contiguous() for p in tensor.chunk(tp, dim=1)]
    if kind == "row_bias" and parallel_residual:
        parts = [tensor / tp] * tp  # exact for tp a power of two, unless a value underflows
        if not torch.equal(merge(kind, parts, True), tensor):
            parts = [tensor.clone()] + [torch.zeros_like(tensor)] * (tp - 1)
        return [p.clone() for p in parts]
    return [tensor.clone() for _ in range(tp)]


# ------------------------------------------------------------------------------------------------------ reading
class NeoXCheckpoint:
    """A global_stepN directory: its layout, tensor-parallel degree and (lazily loaded) per-rank state dicts."""

    def __init__(self, path, *, trust_pickle: bool = False):
        self.path, self.trust_pickle = Path(path), trust_pickle
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: NeoX checkpoint directory not found")
        names = [p.name for p in self.path.iterdir()]
        layer = [tuple(map(int, m.groups())) for m in map(LAYER_FILE.fullmatch, names) if m]
        mp = [int(m.group(1)) for m in map(MP_RANK_FILE.fullmatch, names) if m]
        if layer:  # pipeline checkpoints also hold mp_rank_* engine-state files: the layer files are the weights
            self.layout, self.layers = "layers", sorted({ll for ll, _ in layer})
            ranks = sorted({rr for _, rr in layer})
        elif mp:
            self.layout, self.layers, ranks = "mp_rank", None, sorted(mp)
        else:
            raise CheckpointError(f"{self.path}: no layer_XX-model_YY-model_states.pt or mp_rank_XX_model_states.pt "
                                  f"files (found: {', '.join(sorted(names)) or 'nothing'})")
        if ranks != list(range(len(ranks))):
            raise CheckpointError(f"{self.path}: tensor-parallel ranks {ranks} are not 0..{len(ranks) - 1}")
        self.tp = len(ranks)
        self._modules = None

    def file(self, layer: int, rank: int) -> Path:
        if self.layout == "layers":
            return self.path / f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"
        return self.path / f"mp_rank_{rank:02d}_model_states.pt"

    def _load(self, file: Path) -> dict:
        if not file.exists():
            raise CheckpointError(f"{file}: missing (expected for tensor-parallel degree {self.tp})")
        try:
            obj = torch.load(file, map_location="cpu", mmap=True, weights_only=not self.trust_pickle)
        except Exception as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(f"{file}: holds Python objects besides tensors; if you trust its origin, "
                                      "pass --trust-pickle to unpickle it (runs arbitrary code)") from None
            raise CheckpointError(f"{file}: corrupt or truncated PyTorch checkpoint "
                                  f"({type(e).__name__}: {e})") from None
        if self.layout == "mp_rank":
            obj = obj.get("module") if isinstance(obj, dict) else None
            if not isinstance(obj, dict):
                raise CheckpointError(f"{file}: no 'module' state dict (is this an engine-state file of a pipeline "
                                      "checkpoint without its layer_XX files?)")
        if not isinstance(obj, dict):
            raise CheckpointError(f"{file}: expected a state dict, found {type(obj).__name__}")
        return obj

    def layer_state(self, layer: int, rank: int) -> dict:
        """Pipeline layer `layer` of TP rank `rank` as {param name: tensor} ({} when it has no file)."""
        if self.layout == "layers":
            file = self.file(layer, rank)
            return self._load(file) if layer in self.layers else {}
        if self._modules is None:
            self._modules = [self._load(self.file(0, r)) for r in range(self.tp)]
        prefix = f"sequential.{layer}."
        return {k[len(prefix):]: v for k, v in self._modules[rank].items() if k.startswith(prefix)}

    def present_layers(self) -> list[int]:
        if self.layout == "layers":
            return self.layers
        self.layer_state(0, 0)  # loads the modules
        return sorted({int(k.split(".")[1]) for m in self._modules for k in m if k.startswith("sequential.")})

    def vocab_size(self) -> int:
        rows = [self.layer_state(0, r).get("word_embeddings.weight") for r in range(self.tp)]
        if any(t is None for t in rows):
            raise CheckpointError(f"{self.file(0, 0)}: no word_embeddings.weight in pipeline layer 0")
        return sum(t.shape[0] for t in rows)

    def pipeline_layers(self, config: Config) -> list[tuple[int, dict, str | None]]:
        """(pipeline layer, NeoX -> (HF name, kind) map, HF prefix) for every layer that holds weights."""
        L = config.num_hidden_layers
        plan = [(0, EMBED_KEYS, None)] + [(i + 2, LAYER_KEYS, f"gpt_neox.layers.{i}.") for i in range(L)]
        plan.append((L + 3, NORM_KEYS, None))
        if not config.tie_word_embeddings:
            plan.append((L + 4, HEAD_KEYS, None))
        known = {p for p, _, _ in plan} | ({L + 4} if config.tie_word_embeddings else set())
        extra = [ll for ll in self.present_layers() if ll not in known]
        if extra:
            raise CheckpointError(f"{self.path}: pipeline layer(s) {extra} do not fit the NeoX config's num-layers={L} "
                                  f"(expected layers 0, 2..{L + 1}, {L + 3}"
                                  f"{'' if config.tie_word_embeddings else f', {L + 4}'})")
        return plan


def expected_shapes(config: Config) -> dict:
    """HF name -> shape of every tensor a checkpoint of config holds (no embed_out when tied)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPTNeoX(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("embed_out.weight")
    return shapes


def _rank_shape(kind: str, shape, tp: int) -> list:
    shape = list(shape)
    if kind == "column":
        shape[0] //= tp
    elif kind == "row":
        shape[1] //= tp
    return shape


def _check_rank_tensor(ckpt, layer, rank, key, tensor, hf_name, kind, shapes, config, source):
    expected = _rank_shape(kind, shapes[hf_name], ckpt.tp)
    if list(tensor.shape) != expected:
        field = next((f for k, f in SHAPE_FIELDS.items() if k in hf_name), "hidden-size")
        raise CheckpointError(
            f"{ckpt.file(layer, rank)}: {key} has shape {list(tensor.shape)}, but the NeoX config ({source}) implies "
            f"{expected} at tensor-parallel degree {ckpt.tp}: check {field} (hidden-size={config.hidden_size}, "
            f"intermediate-size={config.intermediate_size}, vocab from the embedding={config.vocab_size})")
    if not tensor.is_floating_point():
        raise CheckpointError(f"{ckpt.file(layer, rank)}: {key} has non-float dtype {tensor.dtype}")


def _check_inv_freq(ckpt, layer, tensor, config, source):
    rot = config.rotary_ndims
    if list(tensor.shape) != [rot // 2]:
        raise CheckpointError(
            f"{ckpt.file(layer, 0)}: attention.rotary_emb.inv_freq has {tensor.numel()} entries, but the NeoX config "
            f"({source}) implies {rot // 2}: check num-attention-heads ({config.num_attention_heads}) and rotary-pct "
            f"({config.rotary_pct}) (rotary dims = hidden-size / num-attention-heads * rotary-pct)")


def neox_tensors(ckpt: NeoXCheckpoint, config: Config, source: str = "NeoX config"):
    """Yield (HF name, merged tensor) for every weight, one pipeline layer at a time, checked against config."""
    shapes = expected_shapes(config)
    for layer, keymap, prefix in ckpt.pipeline_layers(config):
        states = [ckpt.layer_state(layer, r) for r in range(ckpt.tp)]
        for rank, state in enumerate(states):
            if not state:
                raise CheckpointError(f"{ckpt.file(layer, rank)}: pipeline layer {layer} has no tensors "
                                      f"(the NeoX config says num-layers={config.num_hidden_layers})")
            for key in state:
                if key not in keymap:
                    te = " (a Transformer Engine layer: not supported)" if any(m in key for m in TE_MARKERS) else ""
                    raise CheckpointError(f"{ckpt.file(layer, rank)}: unknown tensor {key!r} in pipeline layer "
                                          f"{layer}{te}; expected {', '.join(sorted(keymap))}")
        seen = set()
        for key, entry in keymap.items():
            if entry is None:
                if key in states[0]:
                    _check_inv_freq(ckpt, layer, states[0][key], config, source)
                continue
            name = (prefix or "") + entry[0]
            if key not in states[0]:
                continue
            if name not in shapes:
                raise CheckpointError(f"{ckpt.file(layer, 0)}: {key} exists, but the NeoX config ({source}) has "
                                      "use-bias-in-attn-linear: false")
            parts = []
            for rank, state in enumerate(states):
                if key not in state:
                    raise CheckpointError(f"{ckpt.file(layer, rank)}: missing {key} (rank 0 has it)")
                _check_rank_tensor(ckpt, layer, rank, key, state[key], name, entry[1], shapes, config, source)
                parts.append(state[key])
            seen.add(name)
            yield name, merge(entry[1], parts, config.use_parallel_residual)
        wanted = {(prefix or "") + e[0] for e in keymap.values() if e} & set(shapes)
        if wanted - seen:
            raise CheckpointError(f"{ckpt.file(layer, 0)}: missing tensor(s) for {', '.join(sorted(wanted - seen))}")


def load_neox(path, config_files=None, *, trust_pickle=False):
    """(NeoXCheckpoint, Config, source label) for a global_stepN directory and its YAML config (found if None)."""
    ckpt = NeoXCheckpoint(path, trust_pickle=trust_pickle)
    args, source = read_neox_args(config_files or find_neox_config(ckpt.path))
    tp_config = args.get("model-parallel-size")
    if tp_config is not None and tp_config != ckpt.tp:
        raise CheckpointError(f"{source}: model-parallel-size is {tp_config}, but {ckpt.path} holds {ckpt.tp} "
                              "tensor-parallel rank(s)")
    return ckpt, config_from_neox(args, ckpt.vocab_size(), source), source


# ------------------------------------------------------------------------------------------------------ writing
def check_split(config: Config, tp: int) -> None:
    """Refuse what save_neox cannot write (a model tp does not divide, no PyYAML) before anything is created."""
    _yaml()
    for what, n in (("num_attention_heads", config.num_attention_heads), ("intermediate_size",
                    config.intermediate_size), ("vocab_size", config.vocab_size)):
        if n % tp:
            raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel degree {tp}")
    if config.hidden_act not in ACTIVATIONS.values():
        raise ValueError(f"hidden_act {config.hidden_act!r} has no gpt-neox `activation` equivalent here "
                         f"(supported: {', '.join(ACTIVATIONS.values())})")


def save_neox(tensors, config: Config, dst: Path, *, tp: int, pipe: bool = True, legacy_names: bool = True,
              progress: bool = False):
    """Write HF-named tensors (a mapping name -> tensor, fetched lazily) as a gpt-neox checkpoint into dst.

    pipe: layer_XX-model_YY files (as every Pythia but 14m / 31m); else mp_rank_XX files with a "module" dict.
    Writes only model weights (no optimizer or DeepSpeed engine state) plus configs/model.yml.
    """
    yaml = _yaml()
    check_split(config, tp)
    L, dst = config.num_hidden_layers, Path(dst)
    plan = [(0, EMBED_KEYS, "")] + [(i + 2, LAYER_KEYS, f"gpt_neox.layers.{i}.") for i in range(L)]
    plan.append((L + 3, NORM_KEYS, ""))
    if not config.tie_word_embeddings:
        plan.append((L + 4, HEAD_KEYS, ""))
    rot = config.rotary_ndims
    modules = [{} for _ in range(tp)]
    dtype = tensors["gpt_neox.embed_in.weight"].dtype
    for layer, keymap, prefix in progress_bars.bar(plan, total=len(plan), desc="writing", unit="layer",
                                                   enabled=progress):
        ranks = [{} for _ in range(tp)]
        for key, entry in keymap.items():
            if entry is None:
                inv_freq = 1.0 / (config.rotary_emb_base ** (torch.arange(0, rot, 2).float() / rot))
                for state in ranks:
                    state[key] = inv_freq.to(dtype)
                continue
            if key.startswith("mlp.") and (("linear" in key) == legacy_names) or prefix + entry[0] not in tensors:
                continue
            parts = split(entry[1], tensors[prefix + entry[0]], tp, config.use_parallel_residual)
            for state, part in zip(ranks, parts):
                state[key] = part
        for rank, state in enumerate(ranks):
            if pipe:
                torch.save(state, dst / f"layer_{layer:02d}-model_{rank:02d}-model_states.pt")
            else:
                modules[rank].update({f"sequential.{layer}.{k}": v for k, v in state.items()})
    if not pipe:
        for rank, module in enumerate(modules):
            torch.save({"module": module}, dst / f"mp_rank_{rank:02d}_model_states.pt")
    (dst / "configs").mkdir(exist_ok=True)
    args = neox_args_from_config(config, tp, pipe, dtype)
    (dst / "configs" / "model.yml").write_text(yaml.safe_dump(args, sort_keys=False, default_flow_style=None))
