"""Training checkpoints: an orbax CheckpointManager (in WORKDIR/checkpoints, or any path orbax
can write, such as gs://bucket/run on a pod) holding the train state (z, optimizer state, step, rng), the data iterator state and the run's config.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest. A workdir whose checkpoint was made by
an incompatible config is refused before anything is written, and so is one whose latest
checkpoint cannot be read: the error names the step directory to delete. It is refused, not
skipped for an earlier one: an unreadable file may be a passing storage fault, and the next
save of that step would collide with it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from t2jax.models import llama

# Config keys that change what the saved state means or the optimizer that continues it
# (grad_clip adds a link to the optax chain; lr, schedule, warmup and weight decay change the
# steps still to come; scan_layers stacks z and the optimizer state over layers, another
# tree); any other key may change on resume (e.g. another `eval_every`).
COMPATIBILITY_KEYS = ("model", "dtype", "task", "task_args", "adapter", "objective", "targets",
                      "rank", "parametrisation", "max_mult", "optimizer", "batch_size", "seed",
                      "grad_clip", "lr", "schedule", "warmup_steps", "weight_decay",
                      "scan_layers")
_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout")  # compared in LoRA runs only
# What a checkpoint saved before a key existed was made with.
_BEFORE_THE_KEY = {"scan_layers": False,  # layers were unrolled
                   "adapter": "svf", "objective": "rl",  # SVF by RL, LoRA at its defaults
                   "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}


def config_value(config: dict, key: str):
  """`key` of a saved or current config as compared on resume (a key saved configs predate
  gets the value those runs had)."""
  value = config.get(key, _BEFORE_THE_KEY.get(key))
  if key == "scan_layers":  # compared as the layout it gives, "auto" resolved on this backend
    value = llama.scan_enabled(value)  # (train.py saves it resolved; a saved "auto" is older)
  return value


def _compared_keys(saved_config: dict) -> list[str]:
  """COMPATIBILITY_KEYS, and `steps` when the saved schedule decays over them (a cosine or
  linear horizon); with a constant schedule more steps simply train longer."""
  keys = list(COMPATIBILITY_KEYS)
  if config_value(saved_config, "adapter") == "lora":
    keys.extend(_LORA_KEYS)
  if saved_config.get("schedule", "constant") != "constant":
    keys.append("steps")
  return keys


class CheckpointError(ValueError):
  """A workdir holding a checkpoint this run cannot continue."""


class Checkpoints:
  def __init__(self, directory: str, *, keep: int = 2):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_compatible(self, config: dict, fingerprint: str) -> None:
    """Raises CheckpointError naming every key where the saved run differs from this one."""
    step = self.latest_step()
    if step is None:
      return
    saved = self._read(step, meta=ocp.args.JsonRestore())["meta"]
    diffs = [k for k in _compared_keys(saved["config"])
             if config_value(saved["config"], k) != config_value(config, k)]
    if saved["fingerprint"] != fingerprint:
      diffs.append("model weights (fingerprint)")
    if diffs:
      detail = "; ".join(
          f"{k}: saved {config_value(saved['config'], k)!r}, now {config_value(config, k)!r}"
          for k in diffs if k in config)
      raise CheckpointError(
          f"{self.directory} holds a checkpoint (step {step}) of an incompatible run: "
          f"{', '.join(diffs)} differ ({detail}). Use another --workdir, or delete that "
          "directory to start over.")

  def save(self, step: int, state: Any, data_state: dict, config: dict,
           fingerprint: str) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({"config": config, "fingerprint": fingerprint, "step": step})))

  def restore(self, step: int, like: Any = None) -> tuple[Any, dict]:
    """The state (shaped and placed like `like`; without it, as saved: nested dicts and lists
    of arrays) and the data iterator state of `step`."""
    abstract = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    got = self._read(step, state=ocp.args.StandardRestore(abstract),
                     data=ocp.args.JsonRestore())
    return got["state"], got["data"]

  def _read(self, step: int, **items) -> dict:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises JSON, file and tensorstore errors alike
      path = os.path.join(self.directory, str(step))
      earlier = [s for s in self._manager.all_steps() if s < step]
      then = f"resume from step {max(earlier)}" if earlier else "start over"
      cause = str(e)[:300]  # tensorstore's errors carry whole specs; the chain keeps them
      raise CheckpointError(
          f"checkpoint {path} cannot be read ({type(e).__name__}: {cause}). If it is damaged "
          f"or incomplete, delete {path} to {then}.") from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
