"""scorebook: score-based generative models from first principles.

The package behind the scorebook course book. Its one contract (see
:mod:`scorebook.contract`): a score is a callable ``score(x, t)`` returning a tensor
shaped like ``x``; learned networks and exact oracles both fulfil it, so every loss
and every sampler takes either.
"""
from .contract import ScoreFn, as_time, default_device, evaluate_score

__version__ = "0.1.0"
__all__ = ["ScoreFn", "as_time", "default_device", "evaluate_score", "__version__"]
