"""Discovery: learn which weights, edges, heads or neurons a task needs (a sheaf).

    verb.py         the `discover` verb: load model and task, run a mode, measure on test, write the sheaf
    search.py       the default mode, the keep search: the smallest sheaf of heads and neurons that keeps the task
    loop.py         the mode with density targets: the training loop (Trainer), which wires
      schedule.py     stages, ramps, noise scale and lr as functions of the step
      data.py         each process's training batch and split scores
      attribution.py  the attribution init of the mask logits
      step.py         one training step, its optimizer and gradient normalization
      select.py       which sheaf a run keeps, and early stopping
      state.py        checkpoints and resume
    masks.py        the trained parameters: mask logits and the density controller; shard.py: the same, row-sharded
    gates.py        logits -> masks;  objective.py  losses and metrics of a sheaf on a task
"""

from .verb import discover, work_dir_for

__all__ = ["discover", "work_dir_for"]
