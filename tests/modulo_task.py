"""A task on which any model, a random one included, gets some rows right and some wrong:
record i (of 4 in each split) is solved by a reply whose characters' code points sum to i
modulo 4, and scores +1, else -1. A tiny random model often gives every prompt the same greedy
reply: then exactly one row in four is right. Accuracies compared across layouts or process
counts are then neither 0 nor 1, the reward counts the rows, and a row dropped, counted twice
or scored in another's place moves them.

Registered under the name "modulo": a test monkeypatches the task registry with ENTRY; a
config file run in a subprocess calls register() from get_config()."""

from __future__ import annotations

import dataclasses

from t2jax import tasks


@dataclasses.dataclass(frozen=True)
class Modulo:
  name: str = "modulo"

  def records(self, split):
    return [{"i": i, "question": f"{split} question {i}: say something."} for i in range(4)]

  def messages(self, record):
    return [{"role": "user", "content": record["question"]}]

  def correct(self, record, completion):
    return sum(map(ord, completion)) % 4 == record["i"]

  def reward(self, record, completion):
    return 1.0 if self.correct(record, completion) else -1.0


ENTRY = ("modulo_task", "Modulo")  # tests/ is on sys.path under pytest and in the launchers


def register() -> None:
  tasks._REGISTRY["modulo"] = ENTRY  # pylint: disable=protected-access


def tiny_modulo_config(model_dir: str, **overrides):
  """conftest.tiny_config on the modulo task (which takes no settings)."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel

  c = tiny_config(model_dir, **overrides)
  c.task = "modulo"
  c.task_args = {}
  return c
