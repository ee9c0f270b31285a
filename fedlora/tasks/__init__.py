"""Tasks: what the model learns (classification, causal LM), one module per task, all registered by name.

Importing this package imports every task module so that :func:`get_task` knows them all. A new task (for
example token classification) is one new module with a :class:`Task` subclass and ``@register``.
"""

from __future__ import annotations

from fedlora.tasks import causal_lm, classification  # noqa: F401  (register)
from fedlora.tasks.base import Task, available_tasks, get_task, preflight, register, task_class

__all__ = ["Task", "available_tasks", "get_task", "preflight", "register", "task_class"]
