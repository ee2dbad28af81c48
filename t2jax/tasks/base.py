"""The Task interface: records per split, chat messages for a record, reward for a completion."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence

SPLITS = ("train", "val", "test")
Record = dict[str, Any]


class TaskError(ValueError):
  """A dataset the task cannot use; the message says which file, line or split."""


class Task(Protocol):
  name: str

  def records(self, split: str) -> Sequence[Record]:
    """All records of `split` (train | val | test), in a fixed order."""

  def messages(self, record: Record) -> list[dict[str, str]]:
    """The chat turns that pose `record` to the model."""

  def reward(self, record: Record, completion: str) -> float:
    """Reward of one completion; `correct` says whether it counts as solved."""

  def correct(self, record: Record, completion: str) -> bool:
    """Whether the completion solves the record (the accuracy metric)."""


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise TaskError(f"split {split!r} is unknown; use one of {SPLITS}.")


def read_jsonl(path: str, required: Sequence[str]) -> list[Record]:
  """Records of a JSONL file; a missing file, a malformed line or a missing key is an error
  that names file:line."""
  if not os.path.isfile(path):
    raise TaskError(f"dataset file {path} does not exist.")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
      if not isinstance(rec, dict):
        raise TaskError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}.")
      missing = [k for k in required if k not in rec]
      if missing:
        raise TaskError(f"{path}:{n}: missing key(s) {missing}.")
      out.append(rec)
  if not out:
    raise TaskError(f"{path} holds no records.")
  return out
