"""Math tasks: procedural arithmetic (levels, reproducible, disjoint splits), procedural
multi-step word problems, and GSM8K-format JSONL (`question`, `answer` ending in `#### N`).
Reward: the final number is right."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import random
import re
from typing import Callable, Sequence

from t2jax.tasks.base import (SPLITS, QuestionTask, Record, TaskError, check_split, draw_splits,
                              file_split, read_jsonl, split_of)

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
class _MathBase(QuestionTask):
  system_prompt: str = "Solve the problem. End with 'The answer is N.'"
  reward_wrong: float = -1.0  # the official ±1 reward

  def correct(self, record: Record, completion: str) -> bool:
    got = extract_answer(completion)
    return got is not None and abs(got - float(record["target"])) < 1e-6

  def reference(self, record: Record) -> str:
    """A correct completion in the asked format: 'The answer is N.'"""
    return f"The answer is {format_number(record['target'])}."


def format_number(value: float) -> str:
  """12.0 → '12', 2.5 → '2.5', as an answer is written."""
  value = float(value)
  return str(int(value)) if value.is_integer() else repr(value)


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


# ------------------------------------------------------------------- multi-step word problems
# A story is a starting quantity and 2-3 steps that change it; the question asks for the final
# quantity. A step is (kind, numbers): its wording is drawn separately, so the identity of a
# problem (start, steps) never depends on names, objects or phrasing.

_PEOPLE = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea",
           "Max", "Nia", "Omar", "Pia", "Raj", "Sol", "Tess", "Uma", "Vic", "Wes", "Yara", "Zoe")
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "cards", "shells",
            "coins", "books", "eggs", "beads")
# kind → phrasings; {p} the owner, {o} another person, {x} the objects, {b}/{k}/{m} numbers
_PHRASES = {
    "add": ("{p} buys {b} more {x}.", "{o} gives {p} {b} {x}.", "{p} finds {b} more {x}."),
    "sub": ("{p} gives {b} {x} to {o}.", "{p} loses {b} {x}.", "{p} sells {b} {x} to {o}."),
    "packs": ("{p} buys {k} packs of {x} with {m} {x} in each pack.",
              "{o} gives {p} {k} bags with {m} {x} in each bag."),
    "times": ("{p} {k} the number of {x}.", "{p} collects more {x} and {k} the number."),
    "share": ("{p} shares the {x} equally among {k} friends, {p} included, and keeps one share.",
              "{p} splits the {x} into {k} equal piles and keeps only one pile."),
}


def _word_step(rng: random.Random, total: int) -> tuple[tuple, int]:
  """One step applied to `total`: its identity (kind, numbers) and the new total."""
  kinds = ["add", "sub", "packs", "times"]
  if total > 1 and any(total % k == 0 for k in range(2, 6)):
    kinds.append("share")
  kind = rng.choice(kinds)
  if kind == "add":
    b = rng.randint(2, 15)
    return (kind, b), total + b
  if kind == "sub" and total > 2:
    b = rng.randint(1, min(total - 1, 15))
    return (kind, b), total - b
  if kind == "times" and total <= 20:
    k = rng.randint(2, 3)
    return (kind, k), total * k
  if kind == "share":
    k = rng.choice([k for k in range(2, 6) if total % k == 0])
    return (kind, k), total // k
  k, m = rng.randint(2, 5), rng.randint(2, 10)  # packs; also the fallback of sub and times
  return ("packs", k, m), total + k * m


def _word_text(start: int, steps: Sequence[tuple], rng: random.Random) -> str:
  p, o = rng.sample(_PEOPLE, 2)
  x = rng.choice(_OBJECTS)
  lines = [f"{p} has {start} {x}."]
  for kind, *nums in steps:
    names = dict(zip("km", nums)) if kind == "packs" else (
        {"b": nums[0]} if kind in ("add", "sub") else {"k": nums[0]})
    if kind == "times":
      names["k"] = {2: "doubles", 3: "triples"}[nums[0]]
    lines.append(rng.choice(_PHRASES[kind]).format(p=p, o=o, x=x, **names))
  return " ".join(lines) + f" How many {x} does {p} have now?"


def _draw_word_problem(min_steps: int, max_steps: int,
                       rng: random.Random) -> tuple[tuple, Callable[[], Record]]:
  start = rng.randint(2, 30)
  total, steps = start, []
  for _ in range(rng.randint(min_steps, max_steps)):
    step, total = _word_step(rng, total)
    steps.append(step)
  key = (start, tuple(steps))
  uid = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
  return key, lambda: {"id": f"word/{uid}", "question": _word_text(start, steps, rng),
                       "target": total, "steps": len(steps)}


# Share of the problem space in val and in test, by a hash of each problem's identity.
_WORD_VAL_PCT, _WORD_TEST_PCT = 15, 15


@functools.lru_cache(maxsize=8)
def _word_problems(seed: int, min_steps: int, max_steps: int,
                   sizes: tuple[int, int, int]) -> dict[str, list[Record]]:
  return draw_splits(functools.partial(_draw_word_problem, min_steps, max_steps), seed,
                     dict(zip(SPLITS, sizes)), "math_word", _WORD_VAL_PCT, _WORD_TEST_PCT)


@dataclasses.dataclass(frozen=True)
class WordProblems(_MathBase):
  """Generated multi-step word problems: a person starts with some objects, then 2-3 steps
  (buying more, giving some away, packs of m, k times as many, equal shares) change the count;
  the answer is the final count, a non-negative integer. A stand-in for GSM8K → MATH: the same
  answer format and reward as `math`, but the model must read a story and chain several
  operations. A problem's identity is its start and steps (numbers and kinds, not names, objects
  or wording) and its split is a hash of that identity, so train/val/test never share one."""
  name: str = "math_word"
  min_steps: int = 2
  max_steps: int = 3
  seed: int = 0
  train_size: int = 1000
  val_size: int = 200
  test_size: int = 300

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps <= 5:
      raise TaskError(f"math_word needs 1 <= min_steps <= max_steps <= 5; got "
                      f"{self.min_steps}, {self.max_steps}.")

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    sizes = (self.train_size, self.val_size, self.test_size)
    recs = _word_problems(self.seed, self.min_steps, self.max_steps, sizes)[split]
    if not recs:
      raise TaskError(f"math_word: the {split} split is empty; set {split}_size.")
    return list(recs)
