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
TensorFlow only with the modules that need it (the `kiqa` command's help starts without it).
TensorFlow's start-up noise is hidden as on the command line (`kiqa.console`);
`KIQA_VERBOSE=1` shows everything.
"""

import importlib
import types
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Tuple

from kiqa.console import quiet_tensorflow as _quiet_tensorflow, verbose_requested as _verbose_requested

__version__ = "0.1.0"
# Scripts and notebooks get the CLI's quiet console (before anything imports TensorFlow).
_quiet_tensorflow(_verbose_requested())

# Public name -> (module, attribute), imported on first access (PEP 562).
_LAZY = {
    "load_scorer": ("kiqa.scoring.scorer", "load_scorer"),
    "Scorer": ("kiqa.scoring.scorer", "Scorer"),
    "export_model": ("kiqa.serving.export", "export_model"),
    "TrainConfig": ("kiqa.config", "TrainConfig"),
    "RunDir": ("kiqa.run", "RunDir"),
    "resolve_model": ("kiqa.run", "resolve_model"),
}
# `kiqa.train` and `kiqa.evaluate` are both submodules (`from kiqa import train` is the
# module) and the public functions: each of those modules makes itself a `CallableModule`
# at its end, so `kiqa.train(config)` calls `kiqa.train.train` whichever was imported first.
_CALLABLE_MODULES = ("train", "evaluate")

__all__ = ["__version__", *_LAZY, *_CALLABLE_MODULES]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from kiqa.config import TrainConfig
    from kiqa.evaluate import evaluate
    from kiqa.run import RunDir, resolve_model
    from kiqa.scoring.scorer import Scorer, load_scorer
    from kiqa.serving.export import export_model
    from kiqa.train import train


class CallableModule(types.ModuleType):
    """A submodule that calls the function of its own name: `kiqa.train(...)` is `kiqa.train.train(...)`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def load_lazy(namespace: Dict[str, Any], lazy: Mapping[str, Tuple[str, str]], name: str) -> Any:
    """Imports the attribute `lazy[name]` names, as (module, attribute), and caches it.

    The body of a package's PEP 562 `__getattr__` (kiqa's and kiqa.notebook's).

    Args:
        namespace: the package's `globals()`; the value is stored there, so later
            accesses skip `__getattr__`.
        lazy: public name -> (module, attribute).
        name: the name asked for.

    Returns:
        The attribute.

    Raises:
        KeyError: `lazy` has no `name`.
    """
    module, attribute = lazy[name]
    value = getattr(importlib.import_module(module), attribute)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return load_lazy(globals(), _LAZY, name)
    raise AttributeError(f"module 'kiqa' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
