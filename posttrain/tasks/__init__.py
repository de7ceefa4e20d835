"""Built-in tasks and the tiny-model factory (no downloads; minutes on a CPU).

`make_task("arithmetic", "data/arith")` writes a task's data files, `task.json` and the tiny
model; `list_tasks()` names the tasks. Importing this package stays light: torch and
transformers are imported only when a model is built.
"""

from posttrain.tasks.registry import TASKS, Task, get_task, list_tasks, make_task, register_task

__all__ = ["TASKS", "Task", "get_task", "list_tasks", "make_task", "register_task"]
