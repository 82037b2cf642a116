"""Discovery: learn which weights, edges, heads or neurons a task needs (a sheaf).

verb.py is the entry point (`discover`); search.py is the default mode, the keep search; the trained mode with
density targets is loop.py's Trainer.
"""

from .verb import discover, work_dir_for

__all__ = ["discover", "work_dir_for"]
