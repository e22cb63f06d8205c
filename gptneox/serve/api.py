"""OpenAI's API shapes for gptneox.serve: the request bodies (pydantic, strict types), their checks, the error body,
and the response objects and stream chunks of /v1/completions and /v1/chat/completions.

Only what the server needs from OpenAI's reference (docs/serving.md, "Endpoints"), with OpenAI's limits: n in
1..128, logit_bias {token id: bias in [-100, 100]}, presence / frequency penalties in [-2, 2], several prompts in one
completions request. A field the engine cannot honour (best_of, suffix, tools) is refused with a 400 naming it, never
silently ignored. A response holds one choice per prompt and sample, `index` = prompt index x n + sample.
"""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # completions: logprobs in 0..5 (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs in 0..20 (OpenAI's limit)
MAX_N = 128  # n in 1..128 (OpenAI's limit)
MAX_BIAS = 100  # logit_bias values in [-100, 100] (OpenAI's)
MAX_PENALTY = 2  # presence_penalty, frequency_penalty in [-2, 2] (OpenAI's)
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a string or a bool


class APIError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}} and an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> APIError:
    """A 400 from pydantic's errors (a body that is not JSON, a wrong type, a value out of range): the first one."""
    e = errors[0]
    loc = [str(part) for part in e.get("loc", ()) if part != "body"]
    if e.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {e.get('msg')}", code="invalid_json")
    param = loc[0] if loc else None
    where = f"{param}: " if param else "the request body: "
    return APIError(400, where + e.get("msg", "invalid value"), param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. OpenAI's defaults; None means the default."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)
    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(gt=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[Number, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None
    logit_bias: dict[StrictStr, Number] | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something the engine does not do."""
        return []

    def biases(self, vocab: int) -> dict[int, float] | None:
        """logit_bias as {token id: bias}; a key that is not a token id below vocab, or a bias outside [-100, 100],
        is a 400 naming it."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9 and int(key) < vocab):
                raise APIError(400, f"logit_bias: the key {key[:20]!r} is not a token id in [0, {vocab})",
                               param="logit_bias", code="invalid_value")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise APIError(400, f"logit_bias: the bias of token {key} must lie in [-{MAX_BIAS}, {MAX_BIAS}], got "
                               f"{bias}", param="logit_bias", code="invalid_value")
            out[int(key)] = float(bias)
        return out or None

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}", param="stop",
                           code="invalid_value")
        if any(not s for s in stops):
            raise APIError(400, "stop: a stop sequence must not be empty", param="stop", code="invalid_value")
        return stops


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + (["best_of"] if self.best_of not in (None, 1) else []) + (
            ["suffix"] if self.suffix else [])

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids: one, or a list of them; an empty one is refused."""
        p = self.prompt
        prompts = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for i, one in enumerate(prompts):
            if len(one) == 0:
                which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise APIError(400, f"prompt: {which} is empty", param="prompt", code="invalid_value")
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def pair(self) -> tuple[str, str]:
        """(role, text); OpenAI's "developer" role is the newer name of "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ("system" if self.role == "developer" else self.role), text


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: Annotated[StrictInt, Field(gt=0)] | None = None  # the newer name of max_tokens
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + (["tools"] if self.tools else [])


# ------------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, ids, scores, offset: int) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs (None for a first prompt token), top_logprobs, text_offset
    (characters from the start of the returned text). scores: per token (logprob, [(id, logprob), ...]) or None."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, score in zip(ids, scores):
        piece = tokenizer.decode([token])
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if score is None else score[0])
        out["top_logprobs"].append(None if score is None else {tokenizer.decode([i]): lp for i, lp in score[1]})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokenizer, ids, scores) -> dict:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token, lp):
        text = tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, a) for i, a in top]}
                        for t, (lp, top) in zip(ids, scores)]}


def completion_choice(index, text, finish_reason=None, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(rid, model, choices: list[dict], use, created=None) -> dict:
    """A text_completion (or one chunk of a stream: one choice, usage None)."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, **({"usage": use} if use is not None else {})}


def chat_choice(index, text, finish_reason, logprobs=None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_body(rid, model, choices: list[dict], use) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": use}


def chat_chunk(rid, model, created, index: int, delta: dict | None, finish_reason=None, logprobs=None,
               use=None) -> dict:
    """One chunk of a streamed chat completion, of choice `index`; delta None: the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **({"usage": use} if use is not None else {})}


# ------------------------------------------------------------------------------------- LoRA adapters at runtime
class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[StrictStr, Field(min_length=1)]
    lora_path: Annotated[StrictStr, Field(min_length=1)]


class UnloadAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[StrictStr, Field(min_length=1)]
