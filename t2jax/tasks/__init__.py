"""Tasks: a data source, the prompt for a record and the reward for a completion."""

from __future__ import annotations

from typing import Any, Mapping

from t2jax.tasks.base import Task, TaskError

_REGISTRY = {
    "math": ("t2jax.tasks.math", "Arithmetic"),
    "math_word": ("t2jax.tasks.math", "WordProblems"),
    "gsm8k": ("t2jax.tasks.math", "GSM8K"),
    "code": ("t2jax.tasks.code", "ProceduralCode"),
    "humaneval": ("t2jax.tasks.code", "HumanEval"),
    "mbpp": ("t2jax.tasks.code", "MBPP"),
    "reasoning": ("t2jax.tasks.reasoning", "ProceduralReasoning"),
    "arc": ("t2jax.tasks.reasoning", "ARC"),
    "cls": ("t2jax.tasks.cls", "Classification"),
}


def registered() -> list[str]:
  """The task names make_task knows."""
  return sorted(_REGISTRY)


def make_task(name: str, args: Mapping[str, Any] | None = None) -> Task:
  """The task called `name` built with keyword `args` (a config's task_args)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel

  if name not in _REGISTRY:
    raise TaskError(f"task {name!r} is unknown; use one of {sorted(_REGISTRY)}.")
  module, cls_name = _REGISTRY[name]
  cls = getattr(importlib.import_module(module), cls_name)
  args = dict(args or {})
  known = {f.name for f in dataclasses.fields(cls)} - {"name"}
  unknown = sorted(set(args) - known)
  if unknown:
    raise TaskError(f"task {name!r} has no setting(s) {unknown}; it takes {sorted(known)}.")
  return cls(**args)
