"""An OpenAI-compatible server with continuous batching, for a Pythia or Dolly v2 checkpoint.

    python -m gptneox.serve --ckpt dolly-v2-3b                        # http://127.0.0.1:8000/v1, 8 requests at once
    python -m gptneox.serve --ckpt pythia-1.4b --max-batch-size 32 --api-key "$KEY" --host 0.0.0.0

Endpoints (OpenAI's shapes): GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
"stream": true as server-sent events), GET /health. Concurrent requests decode together in one batch
(gptneox/generation/batching.py); beyond --max-batch-size they wait in a queue of --max-queue, and past that get 503
at once. With a Dolly checkpoint the chat endpoint wraps the conversation in Dolly's instruction template and the
answer ends at "### End"; a base model gets a plain "User: / Assistant:" transcript (gptneox/prompts/chat.py).

LoRA adapters (vLLM's flags and endpoints): --adapter NAME=DIR, repeated, serves each tune under its NAME beside the
base (a request's "model" picks it; /v1/models lists each with "parent": the base), one AdapterBank running every
request on its own tune in the same batch; a lone --adapter without --allow-runtime-adapters is merged into float
weights at load instead. --allow-runtime-adapters adds POST /v1/load_lora_adapter and /v1/unload_lora_adapter. The
endpoints are app.py's; this file is the command line. Needs the serve extra: pip install -e ".[serve]".

Operations: GET /metrics (Prometheus), an access log line per request, --request-timeout, --max-request-bytes (413
past it). SIGTERM or Ctrl-C drains: new requests get 503, those running finish within --shutdown-timeout or end
with an error event (docs/serving.md, "Stopping the server" and "Limits and timeouts"; the metrics' names:
docs/serving.md, "Metrics"). Exit status: 0 after SIGTERM or Ctrl-C, 2 a usage error, 1 a runtime error.
"""

import asyncio
import errno
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

from .. import cli
from ..generation.prefix import BLOCK
from ..loading import LoadPlan, plan
from ..loading import load as gptneox_load
from ..lora import AdapterBank, merge_lora
from ..quant import describe, settings_of

try:  # the serve extra (uvicorn, fastapi, pydantic, prometheus_client): main() says how to install it
    import uvicorn
    from .app import Engine, Service, adapter_rank
    from .http import create_app
except ImportError as e:
    MISSING, UvicornServer = e.name, object  # no Server is made then
else:
    MISSING, UvicornServer = None, uvicorn.Server

FLUSH_S = 2  # after the drain, how long the last responses (the error events of requests ended) may take to send
log = logging.getLogger("gptneox.serve")
FLAGS = {"ckpt": "--ckpt", "adapter": "--adapter", "quantize": "--quantize", "group_size": "--group-size",
         "dtype": "--dtype", "device": "--device"}  # how gptneox.load's errors name them


def port_arg(text: str) -> int:
    """An argparse type for --port: a TCP port, 0 (any free port) to 65535."""
    port = cli.non_negative_int(text)
    if port > 65535:
        raise cli.argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535 (0: any free port), got {port}")
    return port


def seconds_arg(text: str) -> float:
    """An argparse type for a duration in seconds: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise cli.argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise cli.argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def positive_seconds_arg(text: str) -> float:
    value = seconds_arg(text)
    if value == 0:
        raise cli.argparse.ArgumentTypeError("must be more than 0 seconds, got 0")
    return value


class Server(UvicornServer):
    """uvicorn's server with a graceful stop. The first SIGTERM or SIGINT starts the app's Drain: new /v1 requests
    get 503 while those running go on. The server stops once none is left or `timeout` seconds after the signal,
    when engine.stop() ends those still running with an error event; a second signal ends the drain at once. Then
    uvicorn closes the socket and the connections (FLUSH_S for the last responses), and run() returns: exit status
    0 (uvicorn itself would raise the signal again, and its second Ctrl-C would skip stopping the engine)."""

    def __init__(self, config, *, drain, engine, timeout: float):
        super().__init__(config)
        self.drain, self.engine, self.timeout, self.deadline = drain, engine, timeout, None

    def handle_exit(self, sig, frame) -> None:
        name = signal.Signals(sig).name
        if self.deadline is None:
            log.info("%s: draining: new requests get 503; the %d in flight may finish within %g s "
                     "(--shutdown-timeout)", name, self.drain.in_flight, self.timeout)
            self.drain.start()
            self.deadline = time.monotonic() + self.timeout
        else:
            log.info("%s again: ending the drain now", name)
            self.deadline = 0.0

    async def on_tick(self, counter: int) -> bool:
        if self.deadline is not None and not self.should_exit:
            if self.drain.in_flight and time.monotonic() >= self.deadline:
                log.warning("ending %d requests still running (the server is shutting down)", self.drain.in_flight)
                await asyncio.to_thread(self.engine.stop)
            self.should_exit = not self.drain.in_flight or time.monotonic() >= self.deadline
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so that a bad --host (a usage error) or a busy --port (a
    runtime error) is said in one line at once, not after a minute of loading. uvicorn serves on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise cli.UsageError(f"--host {host}: not a host name or address ({why})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRNOTAVAIL:
            raise cli.UsageError(f"--host {host}: not an address of this machine (127.0.0.1 serves this machine, "
                                 "0.0.0.0 every network it is on)") from None
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"--port {port}: {host}:{port} is already in use (another server?); choose another --port, "
                          "or 0 for any free one") from None
        if e.errno == errno.EACCES:
            raise OSError(f"--port {port}: permission denied (ports below 1024 need privileges); choose a port of "
                          "1024 or more") from None
        raise OSError(f"--host {host} --port {port}: {e.strerror}") from None
    return sock


def load(p: LoadPlan, bank: dict | None = None):
    """The model and tokenizer of a checked --ckpt (gptneox.load: quantized while it loads with --quantize, the LoRA
    --adapter attached, the adapter's tokenizer.json winning when it has one), the adapter then merged into the
    weights when the base is float, so that serving costs what the base costs (on a quantized base it stays beside
    it: QLoRA). bank {name: directory}: those tunes in an AdapterBank on the model instead (model.adapter_bank)."""
    model, tokenizer = gptneox_load(p)
    quantized = settings_of(model)
    if p.adapter is not None and quantized is None:
        merge_lora(model)
    how = f", LoRA adapter {p.adapter} {'beside the quantized weights' if quantized else 'merged'}" if p.adapter else ""
    if bank is not None:
        tunes = AdapterBank(model)
        for name, path in bank.items():
            try:
                tunes.add(name, path)
            except ValueError as e:  # AdapterError: a tensor that does not fit the base
                raise cli.UsageError(f"--adapter {name}={path}: {e}") from None
        how = f", LoRA adapters {', '.join(bank) or '(none yet)'} in an AdapterBank"
    log.info("loaded %s on %s: %s weights%s", p.path, p.device, describe(quantized, p.dtype), how)
    return model, tokenizer


NAME = re.compile(r"[^=/\\\s]+")  # NAME of NAME=DIR: no '=', no path separator, no space


def adapter_specs(specs, *, max_adapters=None, max_rank=None, reserved=()) -> dict[str, Path]:
    """{name: directory} of the --adapter flags (NAME=DIR, or a bare DIR named after its folder), every one checked
    (its name unique and not a served model's, its adapter_config.json there, its rank within max_rank, at most
    max_adapters of them) with one line naming the flag: a UsageError."""
    out = {}
    for spec in specs or ():
        name, sep, where = spec.partition("=")
        if not sep or not NAME.fullmatch(name):  # a bare DIR (a path may hold '=': then NAME would hold a '/')
            name, where = Path(spec).name, spec
        if not where or not name:
            raise cli.UsageError(f"--adapter {spec}: give NAME=DIR (or DIR, named after its folder)")
        if name in out or name in reserved:
            raise cli.UsageError(f"--adapter {spec}: the name {name!r} is already taken (give NAME=DIR to name it)")
        try:
            rank = adapter_rank(where)
        except ValueError as e:
            raise cli.UsageError(f"--adapter {spec}: {e}") from None
        if max_rank is not None and rank > max_rank:
            raise cli.UsageError(f"--adapter {spec}: rank {rank} is over --max-adapter-rank {max_rank}")
        out[name] = Path(where)
    if max_adapters is not None and len(out) > max_adapters:
        raise cli.UsageError(f"--max-adapters {max_adapters}: {len(out)} --adapter flags given")
    return out


def main(*, ckpt, adapter=None, quantize=None, group_size=None, host="127.0.0.1", port=8000, max_batch_size=8,
         max_queue=None, max_model_len=None, device="auto", dtype="auto", api_key=None, model_name=None,
         template="auto", log_level="info", threads=None, max_adapters=None, max_adapter_rank=None,
         allow_runtime_adapters=False, shutdown_timeout=30.0, request_timeout=None, max_request_bytes=None,
         max_prefill_tokens=512, prefix_cache=True, prefix_cache_tokens=None) -> int:
    if MISSING is not None:
        raise RuntimeError(f"the server needs the serve extra ({MISSING} is missing): pip install -e \".[serve]\"")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    cli.set_threads(threads)
    dev = cli.pick_device(device)
    group_size = cli.quantize_flags(quantize, group_size)
    if isinstance(adapter, (str, Path)):
        adapter = [str(adapter)]
    served = model_name or Path(ckpt).name
    adapters = adapter_specs(adapter, max_adapters=max_adapters, max_rank=max_adapter_rank, reserved=(served,))
    merged = len(adapters) == 1 and not allow_runtime_adapters  # today's default: the one adapter merged at load
    checked = plan(ckpt, adapter=next(iter(adapters.values())) if merged else None, quantize=quantize,
                   group_size=group_size, dtype=cli.pick_dtype(dtype, dev), device=dev, names=FLAGS)
    path, window = checked.path, checked.config.max_position_embeddings
    if model_name is None and path.name != served and path.name in adapters:
        raise cli.UsageError(f"--adapter: the name {path.name!r} is the base's served name (give NAME=DIR)")
    if prefix_cache_tokens is not None and (prefix_cache_tokens < BLOCK or not prefix_cache):
        raise cli.UsageError(f"--prefix-cache-tokens {prefix_cache_tokens}: " + (
            f"the cache holds blocks of {BLOCK} tokens: give at least {BLOCK}" if prefix_cache
            else "given with --no-prefix-cache, which turns the cache off"))
    if max_model_len is not None and not 2 <= max_model_len <= window:
        raise cli.UsageError(f"--max-model-len must be in [2, {window}] (the model's context window), "
                             f"got {max_model_len}")
    sock = bind(host, port)  # every check before the model loads
    model, tokenizer = load(checked, None if merged or not (adapters or allow_runtime_adapters) else adapters)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, max_len=max_model_len,
                    max_prefill_tokens=max_prefill_tokens, prefix_cache=prefix_cache,
                    prefix_cache_tokens=prefix_cache_tokens, request_timeout=request_timeout)
    template = ("dolly" if tokenizer.is_dolly else "plain") if template == "auto" else template
    service = Service(engine, tokenizer, model_name=model_name or path.name, template=template,
                      adapters=None if merged else adapters, aliases=adapters if merged else None,
                      runtime=allow_runtime_adapters, max_adapters=max_adapters, max_rank=max_adapter_rank)
    app = create_app(service, api_key=api_key, max_request_bytes=max_request_bytes)
    server = Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=FLUSH_S),
                    drain=app.state.drain, engine=engine, timeout=shutdown_timeout)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("serving %s as model %r on http://%s:%d/v1 (Ctrl-C or SIGTERM to stop)", path, service.model_name,
             f"[{bound_host}]" if ":" in bound_host else bound_host, bound_port)
    server.run(sockets=[sock])
    if not server.started:
        raise RuntimeError("the server did not start (its log above says why)")
    return 0


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(__doc__, prog="python -m gptneox.serve")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or model name, as sample.py --ckpt takes it "
                   "(dolly-v2-3b, EleutherAI/pythia-1.4b, a training run's output directory)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="a LoRA adapter directory (train.py --lora-r's output, or PEFT's) served on --ckpt as its "
                   "base under the model name NAME (a bare DIR: named after its folder); repeat for more, each "
                   "request picking one by its \"model\" (the base's own name: no adapter). A lone --adapter without "
                   "--allow-runtime-adapters is merged into the weights at load (its tokenizer.json used when present)")
    p.add_argument("--max-adapters", type=cli.positive_int, metavar="N", help="at most N adapters at once (default: no "
                   "limit); a runtime load past it evicts the least recently used idle one")
    p.add_argument("--max-adapter-rank", type=cli.positive_int, metavar="R",
                   help="refuse an adapter of LoRA rank over R (adapter_config.json's r / rank_pattern)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="serve POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter "
                   "{lora_name} (behind --api-key when set); off by default: anyone who can reach the server could "
                   "then make it read any directory")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization while the checkpoint loads "
                   "(docs/quantization.md); a quantized checkpoint directory needs no flag")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="with --quantize int4: input columns per scale and zero (default 128)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; "
                   "0.0.0.0 serves the network: use --api-key then)")
    p.add_argument("--port", type=port_arg, default=8000, help="TCP port, 0 to 65535 (default 8000; 0: any free port, "
                   "the log says which); checked, with --host, before the model loads")
    p.add_argument("--max-batch-size", type=cli.positive_int, default=8,
                   help="requests decoded together, each in its own KV-cache slot (default 8)")
    p.add_argument("--max-queue", type=cli.non_negative_int,
                   help="requests that may wait for a slot; past that a request gets 503 at once (default 4 x "
                   "--max-batch-size)")
    p.add_argument("--max-model-len", type=cli.positive_int, help="tokens per slot, prompt + completion (default: "
                   "the model's context window); a shorter one shrinks the KV cache")
    p.add_argument("--max-prefill-tokens", type=cli.positive_int, default=512, metavar="N",
                   help="prompt tokens one step may carry beside the running requests' next tokens (default 512); a "
                   "longer prompt is prefilled in chunks over several steps. While requests decode, a step's prompt "
                   "tokens are also held to about half a decode step's cost (measured), so streams keep their pace")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt in full (default: prompt prefixes already computed, such as Dolly's "
                   "preamble or a shared system prompt, are reused in blocks of 16 tokens)")
    p.add_argument("--prefix-cache-tokens", type=cli.positive_int, metavar="N",
                   help="memory of the prefix cache, in tokens (at least 16; default 2 x --max-model-len); the least "
                   "recently used blocks are evicted past it")
    p.add_argument("--device", type=cli.device_arg, default="auto",
                   help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=cli.dtype_arg(extra=("auto",), quantize_flag="--quantize"), default="auto",
                   help="bf16, fp16, fp32; auto (default): bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU")
    p.add_argument("--api-key", default=os.environ.get("GPTNEOX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 requests (401 without it); default: the "
                   "GPTNEOX_API_KEY environment variable, which other users' ps does not show")
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the checkpoint "
                   "directory's name)")
    p.add_argument("--template", default="auto", choices=["auto", "dolly", "plain"],
                   help="chat template: dolly (Dolly's instruction prompt, answers end at '### End'), plain "
                   "('User: / Assistant:' transcript); auto (default): dolly when the tokenizer has Dolly's tokens")
    p.add_argument("--shutdown-timeout", type=seconds_arg, default=30.0, metavar="SECONDS",
                   help="at SIGTERM or Ctrl-C, how long requests already running may take to finish while new ones "
                   "get 503 (default 30, Kubernetes' grace period); those still running then end with an error "
                   "event, and the server exits 0. A second signal ends the wait at once")
    p.add_argument("--request-timeout", type=positive_seconds_arg, metavar="SECONDS",
                   help="end a request that has not finished this long after it arrived, queueing included, with an "
                   "error (a 500, or an error event in a stream that has started); default: no limit")
    p.add_argument("--max-request-bytes", type=cli.positive_int, metavar="N",
                   help="refuse a request body over N bytes with 413 before reading it (default: room for a prompt "
                   "of --max-model-len tokens however it is written; docs/serving.md, \"Limits and timeouts\")")
    cli.add_threads_flag(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default info: uvicorn's line per HTTP request, and an access line per "
                   "finished request from gptneox.serve.access: its id, tokens, time to first token and finish reason)")
    return p

