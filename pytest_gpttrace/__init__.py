"""pytest-gpttrace: numerics assertions for GPT language models.

The package imports torch only when one of its tools is used, so loading the pytest plugin
costs nothing for test sessions that never trace a model.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below imports on first use, as a type checker sees it
    from .stats import tensor_stats as tensor_stats
    from .trace import Iteration as Iteration
    from .trace import TensorStats as TensorStats
    from .trace import Trace as Trace
    from .tracer import Capture as Capture
    from .tracer import capture as capture
    from .tracer import trace_training as trace_training

__version__ = "0.1.0"

_EXPORTS = {
    "capture": "tracer",
    "Capture": "tracer",
    "trace_training": "tracer",
    "Trace": "trace",
    "Iteration": "trace",
    "TensorStats": "trace",
    "tensor_stats": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_gpttrace' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
