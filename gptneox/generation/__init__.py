"""generation: sampling and decoding loops for any model with GPTNeoX's interface (it imports no model, as
transformers' GenerationMixin knows no architecture; GPTNeoX.generate calls in here).

    config.py       GenerationConfig: the settings, validated once
    sampling.py     logits -> scores -> tokens: temperature, top-k, top-p, repetition penalty
    streaming.py    tokens -> text pieces that never split a character or a stop string
    run.py          Run: one call as a loop (prefill a static KV cache, decode token by token)
    speculative.py  SpeculativeRun: the same loop with a draft model
    generator.py    Generator (caches and compiled step across calls, picks the Run), generate, stream
    requests.py     Request, Event: what the serving engine takes and reports
    prefix.py       PrefixCache: computed prompt prefixes, kept by blocks
    batching.py     Engine: continuous batching for the server (one packed forward per step)
"""

from .config import GenerationConfig
from .generator import Generator, generate, stream
from .run import Generation, Run, decode_step, left_pad, prefill, stop_ids

__all__ = ["GenerationConfig", "Generator", "generate", "stream", "Generation", "Run", "decode_step", "left_pad",
           "prefill", "stop_ids"]
