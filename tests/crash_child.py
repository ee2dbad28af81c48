"""`python tests/crash_child.py MODEL_DIR WORKDIR [KEY=VALUE ...] [WHERE:STEP]`: the crash
tests' training run.

Trains `tiny_config(MODEL_DIR, **CONFIG, KEY=VALUE ...)` in WORKDIR (resuming what is there),
as one of several processes when started by launch/local_multiprocess.sh. With WHERE:STEP
the process SIGKILLs itself (no cleanup, no flush, like a lost host) at that moment of that
step:
  rollout  inside the task's reward, while the step's rollouts are scored
  update   once the jitted update has returned the step's new state, before it is logged
  log      halfway through writing the step's metrics.jsonl line
  save     once the step's checkpoint is handed to orbax (its files are still being written)
The hooks are installed here by monkeypatching: training code knows nothing about them. Every
kill but `save` first lets an earlier checkpoint finish writing, so which one survives is fixed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import signal
import sys

import jax

from conftest import tiny_config
from t2jax import checkpoint, distributed, programs, reporting, trainer
from t2jax.train import train

# 4 prompts a batch: splits over the 4 devices of the cross-layout test
CONFIG = dict(steps=6, checkpoint_every=2, batch_size=4)
_saving: list[checkpoint.Checkpoints] = []  # the run's checkpoints, once it has saved
_kill_after_saving: list[int] = []  # steps


def _die(*, settled: bool = True) -> None:
  if settled and _saving:
    _saving[0].wait()
  os.kill(os.getpid(), signal.SIGKILL)


def _watch_saves() -> None:
  real_save = checkpoint.Checkpoints.save

  @functools.wraps(real_save)
  def save(self, step, *args, **kwargs):
    _saving[:] = [self]
    real_save(self, step, *args, **kwargs)
    if step in _kill_after_saving:
      _die(settled=False)

  checkpoint.Checkpoints.save = save


def _kill_in_reward(at: int) -> None:
  real_seed, real_collect = trainer.rollout_seed, trainer.collect
  running = [0]  # the step being run, 1-based: its seed is drawn just before collect

  def rollout_seed(rng, step):
    running[0] = step + 1
    return real_seed(rng, step)

  def collect(*args, **kwargs):
    if running[0] == at:
      type(kwargs["task"]).reward = lambda self, rec, text: _die()
    return real_collect(*args, **kwargs)

  trainer.rollout_seed, trainer.collect = rollout_seed, collect


def _kill_after_update(at: int) -> None:
  real_build = programs.build

  def build(*args, **kwargs):  # the run's programs, its update wrapped
    progs = real_build(*args, **kwargs)

    def update(*a):
      state, metrics = progs.update(*a)
      if int(jax.block_until_ready(state).step) == at:
        _die()
      return state, metrics

    return dataclasses.replace(progs, update=update)

  programs.build = build


def _kill_mid_line(at: int) -> None:
  real_write = reporting.RunLog._write  # pylint: disable=protected-access

  def write(self, record):
    if record.get("kind") == "train" and record["step"] == at:
      line = reporting._line(record)  # pylint: disable=protected-access
      self._file.write(line[:len(line) // 2])  # pylint: disable=protected-access
      self._file.flush()  # pylint: disable=protected-access
      _die()
    real_write(self, record)

  reporting.RunLog._write = write  # pylint: disable=protected-access


HOOKS = {"rollout": _kill_in_reward, "update": _kill_after_update, "log": _kill_mid_line,
          "save": _kill_after_saving.append}


def main(argv: list[str]) -> None:
  distributed.initialize()  # a no-op unless started by launch/local_multiprocess.sh
  model_dir, workdir, *rest = argv
  overrides = dict(CONFIG)
  for arg in rest:
    if "=" in arg:  # a config override, KEY=VALUE
      key, value = arg.split("=", 1)
      overrides[key] = ast.literal_eval(value)
    else:  # a kill point, WHERE:STEP
      where, at = arg.split(":")
      _watch_saves()
      HOOKS[where](int(at))
  train(tiny_config(model_dir, **overrides), workdir, progress=False)


if __name__ == "__main__":
  main(sys.argv[1:])
