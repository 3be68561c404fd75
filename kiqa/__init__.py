"""kiqa: blind (no-reference) image quality assessment with Keras ConvNeXt.

Models predict KonIQ-10k's 0-100 mean opinion score (MOS, higher is better)::

    import kiqa

    scorer = kiqa.load_scorer("runs/koniq")      # a run, .keras file, SavedModel or ONNX export
    scorer.score("photo.jpg")                    # -> float MOS
    scorer.score(open("photo.jpg", "rb").read()) # encoded bytes
    scorer.score_many(paths)                     # -> DataFrame path, mos, error

    result = kiqa.train(kiqa.TrainConfig.demo(run_dir="runs/demo"))
    metrics, out_dir = kiqa.evaluate("runs/demo")
    kiqa.export_model("runs/demo", base_path="export/kiqa")

Importing the package is cheap: every name above is loaded on first use, and
TensorFlow only with the modules that need it (`kiqa --help` starts without it).
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> (module, attribute), imported on first access (PEP 562).
_LAZY = {
    "load_scorer": ("kiqa.scorer", "load_scorer"),
    "Scorer": ("kiqa.scorer", "Scorer"),
    "export_model": ("kiqa.serving.export", "export_model"),
    "TrainConfig": ("kiqa.config", "TrainConfig"),
    "RunDir": ("kiqa.run", "RunDir"),
    "resolve_model": ("kiqa.run", "resolve_model"),
}
# `kiqa.train` and `kiqa.evaluate` are both submodules (`from kiqa import train` is the
# module) and the public functions: the submodule is made callable, calling the function
# named here, so both readings hold whichever was imported first.
_CALLABLE_MODULES = {"train": "train", "evaluate": "evaluate"}

__all__ = ["__version__", *_LAZY, *_CALLABLE_MODULES]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from kiqa.config import TrainConfig
    from kiqa.evaluate import evaluate
    from kiqa.run import RunDir, resolve_model
    from kiqa.scorer import Scorer, load_scorer
    from kiqa.serving.export import export_model
    from kiqa.train import train


class _CallableModule(types.ModuleType):
    """A submodule that can be called as its main function (see `_CALLABLE_MODULES`)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, _CALLABLE_MODULES[self.__name__.rsplit(".", 1)[-1]])(*args, **kwargs)


def _callable_submodule(name):
    def get(package):
        module = importlib.import_module(f"{package.__name__}.{name}")
        if not isinstance(module, _CallableModule):
            module.__class__ = _CallableModule
        return module

    def set_(package, value):
        # The import system binds each submodule on its package once loaded; the getter
        # returns that same module from sys.modules.
        pass

    return property(get, set_, doc=f"`kiqa.{name}`: the module, callable as its `{_CALLABLE_MODULES[name]}`.")


class _Package(types.ModuleType):
    pass


for _name in _CALLABLE_MODULES:
    setattr(_Package, _name, _callable_submodule(_name))
sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later accesses skip this hook
        return value
    raise AttributeError(f"module 'kiqa' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
