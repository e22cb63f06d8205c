"""Module paths of the flat layout (before the layered one, docs/architecture.md) that keep working, each with a
DeprecationWarning naming the new path. MOVED: a module that moved whole; importing the old path gives the module
itself. SPLIT: a module whose names now live in several modules; the old path is a module that finds each name
where it went. gptneox.quantize is one of those: the package's attribute of that name stays the function
gptneox.quantize (an entry in sys.modules is never bound onto its parent), and `from gptneox.quantize import X`
finds X in gptneox.quant."""

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {"gptneox.dolly": "gptneox.prompts.dolly", "gptneox.chat": "gptneox.prompts.chat",
         "gptneox.sampling": "gptneox.generation.sampling", "gptneox.streaming": "gptneox.generation.streaming",
         "gptneox.speculative": "gptneox.generation.speculative", "gptneox.batching": "gptneox.generation.batching",
         "gptneox.adapter": "gptneox.lora.adapter", "gptneox.cpu_quant": "gptneox.quant.cpu",
         "gptneox.train_config": "gptneox.train.config", "gptneox.train_state": "gptneox.train.state",
         "gptneox.data": "gptneox.train.data", "gptneox.schedule": "gptneox.train.schedule",
         "gptneox.distributed": "gptneox.train.distributed", "gptneox.serve_app": "gptneox.serve.app",
         "gptneox.serve_api": "gptneox.serve.api", "gptneox.neox": "gptneox.convert.neox"}
SPLIT = {"gptneox.quantize": ("gptneox.quant.schemes", "gptneox.quant.cpu", "gptneox.quant.linear",
                              "gptneox.quant.transform", "gptneox.loading"),
         "gptneox.kernel_ops": ("gptneox.ops.custom", "gptneox.quant.linear")}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}: import it from there", DeprecationWarning, stacklevel=3)


class Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """MOVED's old paths, at the end of sys.meta_path, so that a real module always wins."""

    def __init__(self):
        self.specs = {}  # old name -> the real module's own spec, which importing under the old name overwrites

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        _warn(spec.name, MOVED[spec.name])
        module = importlib.import_module(MOVED[spec.name])  # the module itself, so both names share one state
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):  # already executed under its own name, which it keeps
        module.__spec__ = self.specs.pop(module.__spec__.name)


class Split(types.ModuleType):
    """A SPLIT old path: each name is looked up in the modules that now hold it, on first use."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"{name} of the flat layout; its names now live in {', '.join(homes)}")
        self.homes = homes

    def __getattr__(self, name: str):
        if not name.startswith("__"):
            for home in self.homes:
                module = importlib.import_module(home)
                if hasattr(module, name):
                    _warn(f"{self.__name__}.{name}", f"{home}.{name}")
                    return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def install() -> None:
    sys.meta_path.append(Moved())
    for name, homes in SPLIT.items():
        sys.modules.setdefault(name, Split(name, homes))
