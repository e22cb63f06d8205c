"""Module paths of the flat layout (before the layered one, docs/architecture.md) that keep working: importing one
gives the module that now holds its code, with a DeprecationWarning naming the new path. Installed by __init__.py
at the end of sys.meta_path, so a real module always wins. gptneox.quantize is not here: that name is the function
gptneox.quantize, and its module is gptneox.quant."""

import importlib
import importlib.abc
import importlib.util
import warnings

MOVED = {"gptneox.dolly": "gptneox.prompts.dolly", "gptneox.chat": "gptneox.prompts.chat",
         "gptneox.sampling": "gptneox.generation.sampling", "gptneox.streaming": "gptneox.generation.streaming",
         "gptneox.speculative": "gptneox.generation.speculative", "gptneox.batching": "gptneox.generation.batching",
         "gptneox.adapter": "gptneox.lora.adapter", "gptneox.cpu_quant": "gptneox.quant.cpu",
         "gptneox.kernel_ops": "gptneox.ops.custom", "gptneox.train_config": "gptneox.train.config",
         "gptneox.train_state": "gptneox.train.state", "gptneox.data": "gptneox.train.data",
         "gptneox.schedule": "gptneox.train.schedule", "gptneox.distributed": "gptneox.train.distributed",
         "gptneox.serve_app": "gptneox.serve.app", "gptneox.serve_api": "gptneox.serve.api",
         "gptneox.neox": "gptneox.convert.neox"}


class Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}: import it from there", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[spec.name])  # the module itself, so both names share one state

    def exec_module(self, module):
        pass  # already executed under its new name
