"""Math tasks: procedural arithmetic (levels, reproducible, disjoint splits) and GSM8K-format
JSONL (`question`, `answer` ending in `#### N`). Reward: the final number is right."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Sequence

from t2jax.tasks.base import Record, TaskError, check_split, file_split, read_jsonl, split_of

# level → (digits of the operands, operators)
LEVELS = {
    1: (1, "+"),
    2: (2, "+"),
    3: (2, "+-"),
    4: (2, "+-*"),
    5: (3, "+-"),
}
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
# Phrases that announce the final answer, most explicit first.
_ANNOUNCED = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
    # "the answer is 10 + 16 = 26": step-by-step answers restate the sum; its result counts
    re.compile(r"answer(?: is|:)\s*\**\s*(" + _NUMBER + r")(?:\s*[-+*/×÷]\s*" + _NUMBER
               + r")*(?:\s*=\s*(" + _NUMBER + "))?", re.IGNORECASE),
]
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
  """'1,234' / '$12' / '12.50' / '-3' → float; None if it is not a number."""
  cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    return float(cleaned)
  except ValueError:
    return None


def extract_answer(completion: str) -> float | None:
  """The final numeric answer of a completion: an announced answer ('#### N', '\\boxed{N}',
  'the answer is N', 'Answer: N', 'the answer is 3 + 4 = N'; the last one wins), else the last
  number in the text.
  Commas, '$', units and trailing text are ignored."""
  for pattern in _ANNOUNCED:
    found = list(pattern.finditer(completion))
    if found:  # the last announcement; of an equation, its result (the last group matched)
      return parse_number(found[-1].group(found[-1].lastindex))
  numbers = _ANY_NUMBER.findall(completion)
  return parse_number(numbers[-1]) if numbers else None


@dataclasses.dataclass(frozen=True)
class _MathBase:
  system_prompt: str = "Solve the problem. End with 'The answer is N.'"
  reward_correct: float = 1.0
  reward_wrong: float = -1.0  # the official ±1 reward

  def messages(self, record: Record) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
    return turns + [{"role": "user", "content": record["question"]}]

  def correct(self, record: Record, completion: str) -> bool:
    got = extract_answer(completion)
    return got is not None and abs(got - float(record["target"])) < 1e-6

  def reward(self, record: Record, completion: str) -> float:
    return self.reward_correct if self.correct(record, completion) else self.reward_wrong


@dataclasses.dataclass(frozen=True)
class Arithmetic(_MathBase):
  """Every problem of a level, split by a hash of its text: the split of a problem never
  depends on the seed, so train/val/test are disjoint by construction."""
  name: str = "math"
  level: int = 2
  val_pct: int = 10
  test_pct: int = 10

  def __post_init__(self):
    if self.level not in LEVELS:
      raise TaskError(f"arithmetic level {self.level} is unknown; use one of {sorted(LEVELS)}.")

  def _all(self) -> list[Record]:
    digits, ops = LEVELS[self.level]
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
    out = []
    for a, b, op in itertools.product(range(lo, hi), range(lo, hi), ops):
      value = a + b if op == "+" else a - b if op == "-" else a * b
      out.append({"question": f"What is {a} {op} {b}?", "target": value})
    return out

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    recs = [r for r in self._all()
            if split_of(r["question"], self.val_pct, self.test_pct) == split]
    if not recs:
      raise TaskError(f"arithmetic level {self.level} has no {split} records.")
    return recs


@dataclasses.dataclass(frozen=True)
class GSM8K(_MathBase):
  """GSM8K-format JSONL files. `val` may be carved out of train (val_pct) when no file is
  given; test is always its own file."""
  name: str = "gsm8k"
  train_path: str = ""
  test_path: str = ""
  val_path: str = ""
  val_pct: int = 10

  def _load(self, path: str, what: str) -> list[Record]:
    if not path:
      raise TaskError(f"gsm8k needs a {what} file: set the task's {what}_path.")
    out = []
    for i, rec in enumerate(read_jsonl(path, ("question", "answer"))):
      if "####" not in rec["answer"]:
        raise TaskError(f"{path}: record {i + 1} has an answer without '#### N'.")
      target = parse_number(rec["answer"].rsplit("####", 1)[1])
      if target is None:
        raise TaskError(f"{path}: record {i + 1}: the text after '####' is not a number.")
      out.append({"question": rec["question"], "target": target})
    return out

  def records(self, split: str) -> Sequence[Record]:
    return file_split(self, split, lambda r: r["question"])
