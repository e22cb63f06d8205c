"""Streaming, atomic, verified conversions into the Hugging Face safetensors layout (and out to gpt-neox's).

Every tensor is read from an mmap, cast if asked, and written into the current output shard, which is flushed as
soon as it is full: host memory stays near one output shard. The output is built in a hidden temporary directory
beside DST, config.json last, and renamed into place only when complete (atomic.atomic_dir). A destination
that overlaps the source is refused, and --force replaces only an earlier conversion's output, as it wrote it
(check_destination, manifest.py). Tokenizer, generation-config and pipeline-code files travel with the weights, both
ways.
Formats: docs/architecture.md, sections "Checkpoint files" and "gpt-neox checkpoints and tensor-parallel merging".
"""

import json
import re
import shutil
from functools import partial
from pathlib import Path

import torch

from .. import atomic, cli
from .. import progress as progress_bars
from ..checkpoint import CheckpointError, ShardWriter, parse_size, quantization_settings
from ..config import Config
from ..model import GPTNeoX
from ..quant.schemes import quantize_weight
from ..quant.schemes import settings as quant_settings
from ..quant.transform import config_entries, targets
from .neox import check_split, expected_shapes, load_neox, neox_tensors, save_neox
from .source import HFCheckpoint, LazyTensors

# files besides the weights that a model directory needs: tokenizer, generation defaults, custom pipeline code (Dolly)
COPIED_FILES = re.compile(r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|"
                          r"vocab\.json|merges\.txt|generation_config\.json|[\w-]+\.py")
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "hidden_act", "rotary_pct", "rotary_emb_base", "layer_norm_eps",
               "use_parallel_residual", "attention_bias", "tie_word_embeddings")
LOGITS_MAX_PARAMS = 500_000_000  # --verify compares logits only below this size (it holds two models in RAM)
CONVERTER = "convert_weights.py"  # the manifest's writer ("... --to hf" / "--to neox"): --force replaces its output


def _dtype(dtype) -> torch.dtype | None:
    """cli.parse_dtype's spellings (bf16, float16, ...) or a torch.dtype; None keeps the stored dtype."""
    return None if dtype is None else cli.parse_dtype(dtype)


# ------------------------------------------------------------------------------------------------ destinations
def _refuse_overlap(src: Path, dst: Path):
    """A dst that is, contains or lies inside src would delete or change the source it is converted from."""
    src, dst = src.resolve(), dst.resolve()  # symlinks and relative parts, as the filesystem will see them
    if dst == src:
        raise ValueError(f"the destination {dst} is the source {src}; write the conversion somewhere else")
    if dst in src.parents:
        raise ValueError(f"the destination {dst} contains the source {src} (replacing it would delete the source); "
                         "write the conversion somewhere else")
    if src in dst.parents:
        raise ValueError(f"the destination {dst} lies inside the source {src}; write the conversion somewhere else")


def check_destination(dst, *, src=None, force=False, force_flag="force=True") -> Path:
    """The destination rules, checked before anything is written; returns dst with symlinks resolved.

    - a dst that is the source, contains it or lies inside it is refused, with or without force;
    - an existing dst that holds anything is refused without force, and with force unless all it holds is an earlier
      conversion's output, unchanged since (its manifest proves it): never a user's files, never a training run.
    force_flag: force as the caller spells it in messages ("--force" on the command line).
    What a killed conversion left beside dst is recovered first (atomic.recover_interrupted).
    """
    dst = Path(dst)
    if src is not None:
        _refuse_overlap(Path(src), dst)
    dst = dst.resolve()
    atomic.recover_interrupted(dst)
    atomic.check_replace(dst, force=force, flag=force_flag, owner=CONVERTER)
    return dst


def conversion_output(dst, *, to="hf", force=False, force_flag="force=True"):
    """atomic.atomic_dir(dst) after check_destination: yields the hidden directory to write the output into."""
    return atomic.atomic_dir(check_destination(dst, force=force, force_flag=force_flag),
                             writer=f"{CONVERTER} --to {to}", force=force, flag=force_flag, owner=CONVERTER)


def copied_files(src: Path) -> dict[str, Path]:
    """{name: file} of the COPIED_FILES in directory src."""
    return {p.name: p for p in sorted(src.iterdir()) if p.is_file() and COPIED_FILES.fullmatch(p.name)}


def _copy(files: dict[str, Path], folder: Path):
    for name, file in files.items():
        shutil.copyfile(file, folder / name)  # a new file, its mode from the umask (copy2 would keep the source's)


# ----------------------------------------------------------------------------------------------------- writing
def write_hf(dst, config: Config, tensors, *, total: int, dtype=None, max_shard_size="5GB", force=False,
             force_flag="force=True", raw_config=None, copy_files=None, progress=False, check=None) -> dict:
    """Write (name, tensor) pairs as an HF safetensors checkpoint directory, atomically. Returns a summary.

    copy_files: {name in dst: file to copy}.
    check: called with the finished temporary directory before it is renamed to dst; returns more summary items.
    """
    dtype, max_bytes = _dtype(dtype), parse_size(max_shard_size)
    with conversion_output(dst, to="hf", force=force, force_flag=force_flag) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        stored = None
        for name, tensor in progress_bars.bar(tensors, total=total, desc="converting", unit="tensor", enabled=progress):
            if tensor.is_floating_point():  # the integers of a quantized weight keep their dtype
                tensor = tensor.to(dtype) if dtype is not None else tensor
                stored = stored or tensor.dtype
            writer.add(name, tensor)
        files = writer.close()
        _copy(copy_files or {}, tmp)
        dtype_name = str(stored).removeprefix("torch.")
        out = {**(raw_config or {}), **config.to_hf_config(), "torch_dtype": dtype_name}
        if "dtype" in out:  # transformers 5 spelling
            out["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")  # last: marks completion
        summary = {"tensors": sum(len(keys) for _, keys in writer.parts), "bytes": writer.total, "files": files,
                   "dtype": dtype_name}
        if check is not None:
            summary.update(check(tmp))  # a failed check deletes tmp: nothing unverified is left behind
    return summary


# --------------------------------------------------------------------------------------------------- verifying
def verify_tensors(expected, actual_get, dtype=None, count=None) -> int:
    """Check every (name, tensor) of expected (cast to dtype) equals actual_get(name) bit for bit; returns the count."""
    dtype, n = _dtype(dtype), 0
    for name, ref in expected:
        ref = ref.to(dtype) if dtype is not None else ref
        got = actual_get(name)
        if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
            diff = (got.double() - ref.double()).abs().max().item() if got.shape == ref.shape else float("nan")
            raise CheckpointError(f"verify: tensor {name!r} differs: {got.dtype} {list(got.shape)} vs expected "
                                  f"{ref.dtype} {list(ref.shape)}, max abs difference {diff:.3g}")
        n += 1
    if count is not None and n != count:
        raise CheckpointError(f"verify: the output holds {count} tensors, the source {n}")
    return n


def model_from_tensors(config: Config, tensors, dtype=None):
    dtype = _dtype(dtype)
    with torch.device("meta"):
        model = GPTNeoX(config)
    state = {name: (t.to(dtype) if dtype is not None else t) for name, t in tensors}
    if config.tie_word_embeddings:
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def verify_logits(ref_model, model, vocab_size: int) -> float:
    """Logits of the two models on fixed random ids must be identical; returns the max abs difference (0.0)."""
    ids = torch.randint(vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = ref_model(ids), model(ids)
    diff = (a.double() - b.double()).abs().max().item()
    if not torch.equal(a, b):
        raise CheckpointError(f"verify: logits differ after conversion (max abs difference {diff:.3g})")
    return diff


def quantized_tensors(tensors, config: Config, settings: dict, dtype=None):
    """(name, tensor) pairs with each linear weight quantize.targets() names replaced, as it streams by, by its
    quantized tensors (name.weight, name.scales, name.zeros), computed from the weight cast to dtype."""
    with torch.device("meta"):
        names = {f"{t}.weight" for t in targets(GPTNeoX(config))}
    dtype = _dtype(dtype)
    for name, tensor in tensors:
        if name not in names:
            yield name, tensor
            continue
        w = tensor.to(dtype) if dtype is not None else tensor
        for key, t in quantize_weight(w, settings["mode"], settings.get("group_size")).items():
            yield name.removesuffix("weight") + key, t


# ------------------------------------------------------------------------------------------------- conversions
def convert_hf(src, dst, *, dtype=None, max_shard_size="5GB", force=False, force_flag="force=True", verify=False,
               progress=False, logits_max_params=LOGITS_MAX_PARAMS, quantize=None, group_size=128) -> dict:
    """Any HF-layout checkpoint -> an HF safetensors directory (config.json, shards + index, tokenizer files).
    quantize: "int8" / "int4" writes the weight-only quantized tensors instead (gptneox/quant/)."""
    src, dst = Path(src), check_destination(dst, src=src, force=force, force_flag=force_flag)
    if (src / "config.json").is_file() and quantization_settings(src) is not None:
        raise CheckpointError(f"{src} is a quantized checkpoint ({quantization_settings(src)}); convert_weights.py "
                              "converts float checkpoints (load it with GPTNeoX.from_pretrained instead)")
    settings = None
    if quantize is not None:
        settings = quant_settings(quantize, group_size)
    ckpt = HFCheckpoint(src)
    copy = copied_files(src)
    if settings is None:
        tensors, raw = ckpt.tensors(), ckpt.raw_config
        check = partial(_verify_hf_output, config=ckpt.config, source_tensors=ckpt.tensors, dtype=dtype,
                        logits_max_params=logits_max_params) if verify else None
    else:
        tensors = quantized_tensors(ckpt.tensors(), ckpt.config, settings, dtype)
        raw = {**ckpt.raw_config, **config_entries(settings)}
        check = partial(_verify_quantized_output, src=src, settings=settings, dtype=dtype,
                        logits_max_params=logits_max_params) if verify else None
    try:
        return write_hf(dst, ckpt.config, tensors, total=len(ckpt.entries), dtype=dtype,
                        max_shard_size=max_shard_size, force=force, force_flag=force_flag, raw_config=raw,
                        copy_files=copy, progress=progress, check=check)
    finally:
        ckpt.close()


def convert_neox(src, dst, *, config_files=None, tokenizer=None, trust_pickle=False, dtype=None,
                 max_shard_size="5GB", force=False, force_flag="force=True", verify=False, progress=False,
                 logits_max_params=LOGITS_MAX_PARAMS) -> dict:
    """A gpt-neox global_stepN directory (any TP degree, with or without pipeline files) -> HF safetensors.
    The COPIED_FILES in src (those export_neox carried there) come along; tokenizer: a file to copy as
    tokenizer.json instead (e.g. gpt-neox's 20B_tokenizer.json)."""
    src, dst = Path(src), check_destination(dst, src=src, force=force, force_flag=force_flag)
    ckpt, config, source = load_neox(src, config_files, trust_pickle=trust_pickle)
    total = len(expected_shapes(config))
    if tokenizer and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"{tokenizer}: tokenizer file not found")
    copy = {**copied_files(src), **({"tokenizer.json": Path(tokenizer)} if tokenizer else {})}
    again = partial(neox_tensors, ckpt, config, source)  # a second, independent read of the source
    check = partial(_verify_hf_output, config=config, source_tensors=again, dtype=dtype,
                    logits_max_params=logits_max_params) if verify else None
    summary = write_hf(dst, config, neox_tensors(ckpt, config, source), total=total, dtype=dtype,
                       max_shard_size=max_shard_size, force=force, force_flag=force_flag, copy_files=copy,
                       progress=progress, check=check)
    return {**summary, "tp": ckpt.tp}


def export_neox(src, dst, *, tp=1, pipe=True, legacy_names=True, dtype=None, force=False, force_flag="force=True",
                verify=False, progress=False, logits_max_params=LOGITS_MAX_PARAMS) -> dict:
    """An HF-layout checkpoint -> gpt-neox model-states files at tensor-parallel degree tp (+ configs/model.yml), with
    the source's COPIED_FILES beside them (convert_neox carries them back)."""
    src, dst = Path(src), check_destination(dst, src=src, force=force, force_flag=force_flag)
    ckpt = HFCheckpoint(src)
    dtype = _dtype(dtype)
    lazy = LazyTensors(ckpt, dtype)
    summary = {"tensors": len(ckpt.entries), "tp": tp, "layout": "layers" if pipe else "mp_rank"}
    try:
        check_split(ckpt.config, tp)  # before anything is created
        with conversion_output(dst, to="neox", force=force, force_flag=force_flag) as tmp:
            save_neox(lazy, ckpt.config, tmp, tp=tp, pipe=pipe, legacy_names=legacy_names, progress=progress)
            _copy(copied_files(src), tmp)
            if verify:  # before the rename: a failure leaves nothing behind
                summary.update(_verify_neox_output(tmp, ckpt, lazy, dtype, logits_max_params))
    finally:
        ckpt.close()
    return summary


def same_architecture(a: Config, b: Config) -> bool:
    """Equal in every field that changes the math (token ids, init and dropout settings aside)."""
    return all(getattr(a, f) == getattr(b, f) for f in ARCH_FIELDS)


def _verify_neox_output(out, ckpt: HFCheckpoint, lazy, dtype, logits_max_params) -> dict:
    back, config, source = load_neox(out)
    if not same_architecture(config, ckpt.config):
        raise CheckpointError(f"verify: {source} describes {config}, the source {ckpt.config}")
    result = {"verified_tensors": verify_tensors(neox_tensors(back, config, source), lazy.__getitem__,
                                                count=len(ckpt.entries))}
    if config.num_parameters <= logits_max_params:
        result["logits_max_abs_diff"] = verify_logits(model_from_tensors(config, ckpt.tensors(), dtype),
                                                      model_from_tensors(config, neox_tensors(back, config)),
                                                      config.vocab_size)
    return result


def _verify_quantized_output(dst, src, settings, dtype, logits_max_params) -> dict:
    """The output loads (config.json and tensors agree) and equals the source quantized while loading, bit for bit."""
    out = GPTNeoX.from_pretrained(dst)
    ref = GPTNeoX.from_pretrained(src, dtype=_dtype(dtype), quantize=settings["mode"],
                                  group_size=settings.get("group_size") or 128)
    state = out.state_dict()
    result = {"verified_tensors": verify_tensors(ref.state_dict().items(), state.__getitem__, count=len(state))}
    if out.config.num_parameters <= logits_max_params:
        result["logits_max_abs_diff"] = verify_logits(ref, out, out.config.vocab_size)
    return result


def _verify_hf_output(dst, config, source_tensors, dtype, logits_max_params) -> dict:
    out = HFCheckpoint(dst)  # re-reads the layout, config.json and every shape
    try:
        if not same_architecture(out.config, config):
            raise CheckpointError(f"verify: {dst}/config.json describes {out.config}, the source {config}")
        result = {"verified_tensors": verify_tensors(source_tensors(), out.get, dtype, count=len(out.entries))}
        if config.num_parameters <= logits_max_params:
            ref = model_from_tensors(config, source_tensors(), dtype)
            result["logits_max_abs_diff"] = verify_logits(ref, GPTNeoX.from_pretrained(dst), config.vocab_size)
    finally:
        out.close()
    return result
