"""sheafprune: find a task's sheaf (joint weight and computation-graph edge pruning, DiscoGP), compact it
into a slim model and evaluate it. The public verbs mirror the command line:

    discover(cfg) -> Sheaf            sheafprune discover
    export(sheaf, out=...) -> dict    sheafprune export
    load(path) -> model               load an exported folder (no trust_remote_code needed)
    evaluate(path_or_name, ...)       sheafprune eval
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["discover", "export", "load", "load_sheaf", "evaluate", "resolve_config", "__version__"]


# Thin wrappers import lazily: `import sheafprune` stays cheap, and the modules keep their own names.
def discover(cfg: Any = None, **kwargs: Any):
    """Learn a sheaf. `cfg` is a DiscoverConfig (see resolve_config); keyword arguments as in discovery.verb.discover."""
    from .config import DiscoverConfig
    from .discovery import discover as _discover

    return _discover(cfg if cfg is not None else DiscoverConfig(), **kwargs)


def export(sheaf: Any, **kwargs: Any) -> dict:
    """Compact `sheaf`, check it against the masked model and write it (see exporter.export)."""
    from .exporter import export as _export

    return _export(sheaf, **kwargs)


def load(path: Any):
    """Load an exported folder as a torch model."""
    from .exporter import load as _load

    return _load(path)


def load_sheaf(path: Any):
    from .sheaf import load_sheaf as _load_sheaf

    return _load_sheaf(path)


def evaluate(path_or_name: Any, **kwargs: Any) -> dict:
    """lm-eval results plus sheaf metrics for an export folder, a sheaf folder or a model name."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(path_or_name, **kwargs)


def resolve_config(**kwargs: Any):
    from .config import resolve_config as _resolve

    return _resolve(**kwargs)
