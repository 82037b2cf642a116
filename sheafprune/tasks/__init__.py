"""Tasks: what a sheaf must still do. Load one by name, encode its items, score the model's logits."""

from sheafprune.tasks.base import (
    SPLITS,
    Batch,
    Item,
    Task,
    answer_weights,
    drop_first_token_collisions,
    encode,
    held_out_size,
    hold_out,
    make_splits,
    score,
)
from sheafprune.tasks.registry import TASKS, is_task_spec, list_tasks, load_task

__all__ = [
    "SPLITS",
    "TASKS",
    "Batch",
    "Item",
    "Task",
    "answer_weights",
    "drop_first_token_collisions",
    "encode",
    "held_out_size",
    "hold_out",
    "is_task_spec",
    "list_tasks",
    "load_task",
    "make_splits",
    "score",
]
