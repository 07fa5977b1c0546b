"""scorebook: score-based generative models from first principles.

The package behind the scorebook course book. Its one contract (see
:mod:`scorebook.contract`): a score is a callable ``score(x, t)`` returning a tensor
shaped like ``x``; learned networks and exact oracles both fulfil it, so every loss
and every sampler takes either.

Submodules follow the mathematics and are imported on first use
(``scorebook.densities``, ``scorebook.sde``, ``scorebook.losses``, ``scorebook.samplers``, ``scorebook.solvers``,
``scorebook.likelihood``, ``scorebook.metrics``, ``scorebook.notation``, ``scorebook.energy``, ``scorebook.partition``,
``scorebook.nets``, ``scorebook.data``, ``scorebook.train``, ``scorebook.plotting``,
``scorebook.cli``).
"""
import importlib

from .contract import ScoreFn, as_time, default_device, evaluate_score

__version__ = "0.1.0"
__all__ = ["ScoreFn", "as_time", "default_device", "evaluate_score", "__version__"]

_SUBMODULES = {"cli", "contract", "data", "densities", "energy", "likelihood", "losses", "metrics", "nets", "notation",
               "partition", "plotting", "samplers", "sde", "solvers", "train"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scorebook' has no attribute {name!r}")
