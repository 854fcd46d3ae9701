"""All built-in benchmark tasks, registered in :data:`TASKS` on import."""

from __future__ import annotations

from modalign.benchmark import tasks_classify, tasks_retrieval, tasks_robust  # noqa: F401
from modalign.benchmark.task_registry import TASKS, Task

__all__ = ["TASKS", "Task"]
