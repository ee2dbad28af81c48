"""The Task interface: records per split, chat messages for a record, reward for a completion."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import Any, Callable, Mapping, Protocol, Sequence

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


@dataclasses.dataclass(frozen=True)
class QuestionTask:
  """What the question-answering tasks share: the record's `question` as the user turn (after
  `system_prompt`, if any), and a reward of reward_correct or reward_wrong by `correct`."""
  system_prompt: str = ""  # "" = the chat template's own
  reward_correct: float = 1.0
  reward_wrong: float = 0.0

  def messages(self, record: Record) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
    return turns + [{"role": "user", "content": record["question"]}]

  def correct(self, record: Record, completion: str) -> bool:
    raise NotImplementedError

  def reward(self, record: Record, completion: str) -> float:
    return self.reward_correct if self.correct(record, completion) else self.reward_wrong


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


def split_of(key: str, val_pct: int, test_pct: int) -> str:
  """The split of a record by a hash of its identity: stable across runs, machines and
  dataset orderings, so a record never moves between train and test."""
  bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
  if bucket < test_pct:
    return "test"
  if bucket < test_pct + val_pct:
    return "val"
  return "train"


# Consecutive draws that add nothing before a generator counts as exhausted.
_GIVE_UP = 5000


def draw_splits(draw: Callable[[random.Random], tuple[Any, Callable[[], Record]]], seed: int,
                sizes: Mapping[str, int], what: str, val_pct: int,
                test_pct: int) -> dict[str, list[Record]]:
  """Distinct generated problems per split. `draw(rng)` returns a problem's identity and a
  function that builds its record from the rest of `rng`; the identity's hash picks the
  split (`split_of`), so the same problem can never land in train and in test."""
  rng = random.Random(seed)
  out: dict[str, list[Record]] = {s: [] for s in sizes}
  seen: set[str] = set()
  idle = 0
  while any(len(out[s]) < n for s, n in sizes.items()):
    key, build = draw(rng)
    name = repr(key)
    if name not in seen:
      # every new problem is built, kept or not, so the stream of draws does not depend on
      # `sizes`: a smaller request gets a prefix of each split of a larger one.
      seen.add(name)
      record = build()
      split = split_of(name, val_pct, test_pct)
      if split in out and len(out[split]) < sizes[split]:
        out[split].append(record)
        idle = 0
        continue
    idle += 1
    if idle >= _GIVE_UP:
      short = next(s for s, n in sizes.items() if len(out[s]) < n)
      raise TaskError(f"{what}: too few distinct problems for {short} "
                      f"({len(out[short])} of {sizes[short]}); ask for fewer records or "
                      f"allow more levels/kinds.")
  return out


def file_split(task, split: str, key: Callable[[Record], str]) -> list[Record]:
  """records(split) of a task read from files (`task._load(path, what)`, its train_path,
  test_path, val_path and val_pct): test is always its own file; val is its own file, or is
  carved out of train by a hash of key(record) when no val file is given."""
  check_split(split)
  if split == "test":
    return task._load(task.test_path, "test")  # pylint: disable=protected-access
  if task.val_path:
    return task._load(task.train_path if split == "train" else task.val_path, split)  # pylint: disable=protected-access
  recs = [r for r in task._load(task.train_path, "train")  # pylint: disable=protected-access
          if (split_of(key(r), task.val_pct, 0) == "val") == (split == "val")]
  if not recs:
    raise TaskError(f"{task.name}: the {split} split of {task.train_path} is empty.")
  return recs
