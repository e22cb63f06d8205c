"""EleutherAI's lm-evaluation-harness with our model: the lm-eval model "gptneox" (the command line: cli.py).

    python -m gptneox.eval --model_args pretrained=pythia-160m,dtype=float32 --tasks lambada_openai --device cuda
    lm_eval.simple_evaluate(model=GPTNeoXLM(pretrained="checkpoints/my-run"), tasks=["arc_easy"])

GPTNeoXLM answers the harness's three request types with HFLM's conventions (lm_eval/models/huggingface.py, 0.4.13),
so its numbers are HFLM's: the context and continuation are tokenized together and the context's trailing
whitespace moves into the continuation (TemplateLM._encode_pair); an empty context is the prefix token
<|endoftext|>; a request longer than the window is cut from the left to its last max_length + 1 tokens; perplexity
scores disjoint rolling windows of max_length tokens; generation is greedy unless do_sample, stops at `until` (plus
the eos text) or max_gen_toks (256), and is cut at the first stop string. Where it differs, on purpose: the logits
are cut to the tokenizer's real vocabulary (Pythia pads 50277 tokens to 50304 rows, which HFLM's softmax includes),
and log-softmax runs in fp32 whatever the model's dtype (HFLM's runs in the model's). What makes it faster: every
request that shares a context (after truncation) shares one forward of it, prefilled into a KV cache, and only the
continuation positions are projected to the vocabulary. Facts and commands: docs/evaluation.md.

lm-eval is the optional extra `pip install -e ".[eval]"`; importing this module registers "gptneox" in its model
registry (lm-eval 0.4.13 reads no entry points, so `lm_eval --model gptneox` cannot find it: docs/evaluation.md).
"""

import json
import logging
from collections import Counter

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # lm-eval is an extra, never a runtime dependency
    raise ImportError(f"gptneox.eval needs lm-eval ({e}): pip install -e \".[eval]\" or pip install lm-eval") from None
from tqdm import tqdm  # an lm-eval dependency

from .. import devices
from ..devices import resolve_dtype
from ..generation.config import GenerationConfig
from ..generation.generator import Generator
from ..generation.run import left_pad
from ..loading import load
from ..model import GPTNeoX
from ..prompts.dolly import END_KEY, format_prompt
from ..tokenizer import Tokenizer

MODEL_NAME = "gptneox"
MAX_GEN_TOKS = 256  # HFLM.max_gen_toks: the default when a task's generation_kwargs give none
# --model_args of "gptneox" (GPTNeoXLM's keyword arguments), as `python -m gptneox.eval --help` explains them
MODEL_ARGS_HELP = {
    "pretrained": "a checkpoint directory or a model name: pythia-160m, EleutherAI/pythia-1.4b@step3000 (required)",
    "revision": "a hub revision of a named model (step3000, main)",
    "tokenizer": "a tokenizer.json or a directory holding one (default: the adapter's, else pretrained's)",
    "adapter": "a LoRA adapter directory (train.py --lora-r's, or PEFT's) attached to pretrained",
    "quantize": "int8 or int4: weight-only quantization while loading (a quantized checkpoint needs none)",
    "group_size": "with quantize=int4: input columns per scale and zero (default 128)",
    "dtype": "auto (default: the checkpoint's own, as HFLM), float32, bfloat16, float16 (or fp32, bf16, fp16)",
    "device": "auto (default: cuda when present), cpu, cuda, cuda:N; the same as --device",
    "batch_size": "requests per forward (default 1; lm-eval's --batch_size sets it too)",
    "max_batch_size": "accepted, unused",
    "backend": "attention: eager, sdpa or triton (default: sdpa, triton for fp16 / bf16 on CUDA)",
    "max_length": "the context window in tokens (default and at most: the model's)",
    "dolly_template": "true: wrap generation prompts in Dolly v2's instruction template, stop at ### End",
}
MODEL_ARGS = tuple(MODEL_ARGS_HELP)
SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")  # generation kwargs passed through
NAMES = {"ckpt": "pretrained"}  # how gptneox.load's errors name the arguments that model_args spell differently
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ helpers
def resolve_device(name) -> torch.device:
    """torch.device for model_args device: None or "auto" picks CUDA when present; a device this machine lacks is
    refused in one line, the rule of every gptneox entry point (gptneox.devices.resolve_device)."""
    return devices.resolve_device("auto" if name is None else name, name="device")


def positive_int(value, name: str) -> int:
    """An int >= 1 from a model_args value (lm-eval passes ints, or strings from a config file)."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        hint = "; batch_size=auto (HFLM's out-of-memory probe) is not supported" if name == "batch_size" else ""
        raise ValueError(f"model_args {name} must be a positive integer, got {value!r}{hint}")
    return n


def fit_window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], bool]:
    """(the context the model sees, whether it was cut): HFLM feeds (context + continuation)[-(max_length + 1):][:-1],
    so a context is kept to its last max_length + 1 - len(continuation) tokens."""
    if not continuation:
        raise ValueError("a loglikelihood continuation tokenizes to no tokens: there is nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the context window of "
                         f"{max_length} tokens: nothing would be left to condition on")
    keep = max_length + 1 - len(continuation)
    return context[-keep:], len(context) > keep


def score(logits: torch.Tensor, tokens: list[int]) -> tuple[float, bool]:
    """(sum of log-probabilities of tokens [n], whether each is the argmax) under logits [n, V], in fp32."""
    target = torch.tensor(tokens, device=logits.device)
    # [n, V]; log_softmax, faster on the CPU than logsumexp (docs/benchmarks.md, "Log-softmax on the CPU")
    logprobs = logits.float().log_softmax(-1)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


# ------------------------------------------------------------------------------------------------- the model
class GPTNeoXLM(TemplateLM):
    """The lm-eval model "gptneox": GPTNeoX and its Tokenizer behind loglikelihood, loglikelihood_rolling and
    generate_until (see the module docstring for the conventions).

    The keyword arguments are MODEL_ARGS_HELP's; in Python, pretrained may also be a GPTNeoX (then give its tokenizer)
    and tokenizer a Tokenizer.
    """

    def __init__(self, pretrained=None, *, revision=None, tokenizer=None, adapter=None, quantize=None, group_size=128,
                 dtype="auto", device=None, batch_size=1, max_batch_size=None, backend=None, max_length=None,
                 dolly_template=False, **unknown):
        super().__init__()
        check_model_args(unknown)
        if pretrained is None:
            raise ValueError("model_args pretrained is required: a checkpoint directory or a model name "
                             "(pretrained=pythia-160m, pretrained=EleutherAI/pythia-1.4b@step3000)")
        self._device = resolve_device(device)
        quantized = dict(quantize=quantize, group_size=positive_int(group_size, "group_size")) if quantize else {}
        self.model, self.tokenizer = self._load(pretrained, revision, tokenizer, adapter, quantized, dtype, backend)
        self.revision, self.dolly_template = revision, bool(dolly_template)
        self._batch_size = positive_int(batch_size, "batch_size")
        limit = self.model.config.max_position_embeddings
        self._max_length = limit if max_length is None else positive_int(max_length, "max_length")
        if self._max_length > limit:
            raise ValueError(f"model_args max_length={self._max_length} exceeds the model's context window of {limit} "
                             "tokens (config.json max_position_embeddings)")
        self.vocab_size = self._real_vocab()
        self.model.resize_token_embeddings(self.vocab_size)  # scoring and generation see the real tokens only
        self.generator = Generator(self.model)  # holds the KV cache across generate_until batches
        self.truncated = Counter()  # requests cut from the left to fit the window, by request type

    def _load(self, pretrained, revision, tokenizer, adapter, quantized, dtype, backend):
        dtype = None if dtype in (None, "auto") else dtype  # "auto": the checkpoint's own, as HFLM
        if not isinstance(pretrained, GPTNeoX):
            return load(pretrained, revision=revision, tokenizer=tokenizer, adapter=adapter, dtype=dtype,
                        device=self._device, backend=backend, names=NAMES, **quantized)
        if tokenizer is None:
            raise ValueError("pretrained is a GPTNeoX instance: give its tokenizer too (tokenizer=...)")
        if adapter is not None or quantized:
            raise ValueError("pretrained is a GPTNeoX instance: quantize it or attach the adapter to it first "
                             "(gptneox.quantize, gptneox.lora)")
        model = pretrained.to(device=self._device, dtype=resolve_dtype(dtype)).eval()
        if backend is not None:
            model.backend = backend
        tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(tokenizer)
        return model, tokenizer

    def _real_vocab(self) -> int:
        """The rows that are tokens: the tokenizer's count. Pythia's padding rows (50277..50303) are cut from the model
        (in place, for a GPTNeoX passed as pretrained), so no softmax and no argmax sees them."""
        rows, tokens = self.model.config.vocab_size, self.tokenizer.vocab_size
        if tokens > rows:
            raise ValueError(f"{self.tokenizer.source} has {tokens} tokens but the model's embedding has only {rows} "
                             "rows (config.json vocab_size): they do not belong together")
        return tokens

    # ------------------------------------------------------------------------------- what the harness reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:  # HFLM: the bos token (<|endoftext|> for Pythia and Dolly)
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        """Token ids of string; the Pythia / Dolly tokenizer adds no special tokens either way (tokenizer.py)."""
        ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template=False):
        if chat_template:
            raise ValueError("--apply_chat_template: gptneox has no chat template (Pythia and Dolly v2 ship none); for "
                             "Dolly's instruction format use --model_args ...,dolly_template=True")
        return None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.chat_template(True)

    def get_model_info(self) -> dict:
        """Goes into the results' "config": what ran, and how many requests were cut to fit the window."""
        w = self.model.gpt_neox.embed_in.weight  # embed_out may hold int8 / int4 (gptneox.quant)
        return {"model_num_parameters": self.model.config.num_parameters, "model_dtype": str(w.dtype),
                "model_revision": self.revision, "model_sha": "", "max_length": self.max_length,
                "truncated_requests": dict(self.truncated)}

    def _count_truncated(self, kind: str, n: int, total: int) -> None:
        if n:
            self.truncated[kind] += n
            log.warning("%d of %d %s requests are longer than the context window of %d tokens and were cut from the "
                        "left, as HFLM does", n, total, kind, self.max_length)

    # --------------------------------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each (context, continuation), tokenized by TemplateLM.loglikelihood (HFLM's
        rules)."""
        empty = sorted({str(req.task_name) for req in requests if req.args[1] == ""})
        if empty:
            raise ValueError(f"task(s) {', '.join(empty)} send loglikelihood requests with an empty continuation: "
                             "there is nothing to score")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each ((context, continuation) or None, context ids, continuation ids), in order.
        Requests whose (truncated) contexts are equal form a group; a batch is whole groups, longest first."""
        groups, conts, cut = {}, [], 0
        for i, (_, context, continuation) in enumerate(requests):
            context, was_cut = fit_window(list(context), list(continuation), self.max_length)
            cut += was_cut
            conts.append(list(continuation))
            groups.setdefault(tuple(context), []).append(i)
        self._count_truncated("loglikelihood", cut, len(requests))
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for batch in self._batches(groups, conts):
            indices = [i for _, idx in batch for i in idx]
            for i, answer in zip(indices, self._score_batch(batch, conts)):
                results[i] = answer
                if requests[i][0] is not None:  # rolling windows are cached per document instead
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(indices))
        bar.close()
        return results

    def _batches(self, groups: dict, conts: list):
        """Lists of (context, request indices) with at most batch_size requests in all, the longest first (as HFLM:
        little padding, and the peak of memory comes at once); a context with more requests is split."""
        n = self.batch_size
        items = [(ctx, idx[k:k + n]) for ctx, idx in groups.items() for k in range(0, len(idx), n)]
        items.sort(key=lambda item: -(len(item[0]) + max(len(conts[i]) for i in item[1])))
        batch, size = [], 0
        for item in items:
            if size + len(item[1]) > n:
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += len(item[1])
        if batch:
            yield batch

    @torch.no_grad()
    def _score_batch(self, batch, conts) -> list[tuple[float, bool]]:
        """One forward of the G contexts (left-padded, into a KV cache; the last position alone is projected: it
        predicts every continuation's first token), then one of the N continuations but their last tokens."""
        ids, mask = left_pad([list(ctx) for ctx, _ in batch], self.tokenizer.pad_id, device=self.device)  # [G, Tc]
        G, Tc = ids.shape
        padded = not bool(mask.all())
        positions = (mask.cumsum(-1) - 1).clamp_min(0) if padded else None  # [G, Tc] rotary counts real tokens
        cache = self.model.new_cache(G, Tc)
        first = self.model(ids, position_ids=positions, attention_mask=mask if padded else None, cache=cache,
                           input_pos=torch.arange(Tc, device=self.device), logits_to_keep=1)[:, -1]  # [G, V]
        rows = [g for g, (_, idx) in enumerate(batch) for _ in idx]  # request n continues context rows[n]
        requested = [conts[i] for _, idx in batch for i in idx]
        tails = [cont[:-1] for cont in requested]
        rest = self._continuations(cache, mask, rows, tails) if any(tails) else None  # [N, Tm, V]
        out = []
        for n, (g, cont) in enumerate(zip(rows, requested)):
            lp, greedy = score(first[g:g + 1], cont[:1])
            if len(cont) > 1:
                lp_rest, greedy_rest = score(rest[n, :len(cont) - 1], cont[1:])
                lp, greedy = lp + lp_rest, greedy and greedy_rest
            out.append((lp, greedy))
        return out

    def _continuations(self, cache, mask, rows: list[int], tails: list[list[int]]) -> torch.Tensor:
        """Logits [N, Tm, V] of the continuations' tokens but the last (right-padded to Tm), each fed after its
        context's cached keys and values (the G-row cache is copied out to N rows)."""
        G, Tc = mask.shape
        N, Tm = len(tails), max(map(len, tails))
        index = torch.tensor(rows, device=self.device)
        big = self.model.new_cache(N, Tc + Tm)
        for small, layer in zip(cache, big):
            layer.k_cache[:, :, :Tc] = small.k_cache.index_select(0, index)  # [N, nh, Tc, hs]
            layer.v_cache[:, :, :Tc] = small.v_cache.index_select(0, index)
        x = torch.full((N, Tm), self.tokenizer.pad_id, dtype=torch.long)
        for n, tail in enumerate(tails):
            x[n, :len(tail)] = torch.tensor(tail, dtype=torch.long)  # right padding: no real token sees it
        mask = mask.index_select(0, index)  # [N, Tc]
        positions = mask.sum(-1, keepdim=True) + torch.arange(Tm, device=self.device)  # [N, Tm]
        slots = torch.cat([mask, torch.ones(N, Tm, dtype=mask.dtype, device=self.device)], dim=-1)  # [N, Tc + Tm]
        return self.model(x.to(self.device), position_ids=positions, attention_mask=slots, cache=big,
                          input_pos=torch.arange(Tc, Tc + Tm, device=self.device))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: disjoint windows of max_length predicted tokens, the first after the
        prefix token, each later one after as much of the document as fits (lm_eval.utils.get_rolling_token_windows)."""
        windows, owners = [], []
        for r, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text of each (context, generation kwargs), cut at the first stop string. Requests with the same
        kwargs are batched, longest prompt first (HFLM's order)."""
        by_kwargs = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for idx in by_kwargs.values():
            tasks = sorted({str(requests[i].task_name) for i in idx})
            config, until = self._generation_config(requests[idx[0]].args[1], tasks)
            prompts = self._prompts([requests[i].args[0] for i in idx], self.max_length - config.max_new_tokens)
            order = sorted(range(len(idx)), key=lambda k: (-len(self.tok_encode(requests[idx[k]].args[0])),
                                                           requests[idx[k]].args[0]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                tokens = self.generator.generate([prompts[k] for k in batch], config, tokenizer=self.tokenizer)
                for k, row in zip(batch, tokens.tolist()):
                    text = postprocess_generated_text(self._decode(row, config), until, None)
                    results[idx[k]] = text
                    self.cache_hook.add_partial("generate_until", requests[idx[k]].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generation_config(self, gen_kwargs: dict, tasks: list[str]) -> tuple[GenerationConfig, list[str]]:
        """(GenerationConfig, stop strings) for a task's generation kwargs, normalized as HFLM does."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks, do_sample = kwargs.pop("max_gen_toks"), kwargs.pop("do_sample", False)
        settings = {k: kwargs.pop(k) for k in SAMPLING if k in kwargs}
        if kwargs:
            raise ValueError(f"task(s) {', '.join(tasks)} ask for generation kwargs {', '.join(sorted(kwargs))}, which "
                             f"gptneox's generator does not have (it has until, max_gen_toks, do_sample, "
                             f"{', '.join(SAMPLING)})")
        if not do_sample:
            settings["temperature"] = 0.0
        if self.max_length <= max_gen_toks:
            raise ValueError(f"task(s) {', '.join(tasks)}: max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                             f"the context window of {self.max_length} tokens")
        eos = list(self.model.config.eos_token_ids)
        if self.dolly_template:
            until = until + [END_KEY] if END_KEY not in until else until
            eos += [self.tokenizer.end_key_id] if self.tokenizer.end_key_id is not None else []
        config = GenerationConfig(max_new_tokens=max_gen_toks, eos_token_id=tuple(eos), stop_strings=until, **settings)
        return config, until

    def _prompts(self, contexts: list[str], max_ctx: int) -> list[list[int]]:
        """Prompt ids (in Dolly's template with dolly_template), cut from the left to max_ctx tokens as HFLM does; an
        empty prompt starts from the prefix token."""
        texts = [format_prompt(c) for c in contexts] if self.dolly_template else contexts
        prompts = [self.tok_encode(t) or [self.prefix_token_id] for t in texts]
        self._count_truncated("generate_until", sum(len(p) > max_ctx for p in prompts), len(prompts))
        return [p[-max_ctx:] for p in prompts]

    def _decode(self, row: list[int], config: GenerationConfig) -> str:
        """The text of a generated row up to its stop token, special tokens skipped (HFLM's tok_decode)."""
        ends = set(config.eos_token_id)
        cut = next((i for i, t in enumerate(row) if t in ends), len(row))
        return self.tok_decode(row[:cut])


def check_model_args(unknown: dict) -> None:
    """Refuse model_args we do not know, naming the valid ones."""
    if unknown:
        raise ValueError(f"unknown model_args {', '.join(sorted(unknown))} for --model {MODEL_NAME}; valid: "
                         f"{', '.join(MODEL_ARGS)}")


register_model(MODEL_NAME)(GPTNeoXLM)
