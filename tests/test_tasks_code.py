"""Code tasks: program extraction, HumanEval / MBPP data and programs, procedural problems
whose references pass their own tests in the sandbox and whose splits are disjoint."""

from __future__ import annotations

import json
import random
import re

import pytest

from t2jax.tasks import make_task, sandbox
from t2jax.tasks.base import TaskError, draw_splits
from t2jax.tasks.code import (MBPP, HumanEval, ProceduralCode, _make_problem, _procedural,
                              extract_code)
from t2jax.tasks.code_templates import TEMPLATES

# Every program run here is ours or HumanEval's, so where bubblewrap is missing they may run
# without isolation; the sandbox's own tests cover the isolation.
UNSAFE = not sandbox.available()
SPLITS = ("train", "val", "test")


def fenced(code: str, tag: str = "python") -> str:
  return f"Here it is:\n```{tag}\n{code}\n```\nIt works."


@pytest.mark.parametrize("text,want", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),
    ("Sure!\n```py\nx = 1\n```\nand\n```python\nx = 2\n```\n```text\n2\n```", "x = 2"),
    ("```\nprint(3)\n```", "print(3)"),
    ("``` python3 \nprint(4)\n```", "print(4)"),
    ("```python\ndef f():\n    return 5", "def f():\n    return 5"),  # cut off: no closing fence
    ("def g(x):\n    return x\n", "def g(x):\n    return x"),
    ("    return x + 1\n", "    return x + 1"),  # a bare body keeps its indent
    ("Use `a = b` inline, then:\n  ```python\n  y = 6\n  ```", "  y = 6"),
])
def test_extract_code(text, want):
  assert extract_code(text) == want


SHOTS = {"HumanEval/145", "HumanEval/91", "HumanEval/84", "HumanEval/85", "HumanEval/149",
         "HumanEval/61", "HumanEval/86", "HumanEval/151"}  # as the HumanEval docstring lists


def test_humaneval_shots_held_out():
  task = HumanEval()
  ids = {s: [r["task_id"] for r in task.records(s)] for s in SPLITS}
  assert set(ids["train"]) == set(ids["val"]) == SHOTS and len(ids["train"]) == 8
  assert len(ids["test"]) == 156 and not SHOTS & set(ids["test"])
  every = set(ids["test"]) | SHOTS
  assert len(every) == 164
  assert {r["task_id"] for r in HumanEval(shots_held_out=4).records("val")} < SHOTS
  assert len(HumanEval(shots_held_out=4).records("test")) == 160
  with pytest.raises(TaskError, match="shots_held_out=0"):
    HumanEval(test_pct=100)
  with pytest.raises(TaskError, match="shots_held_out must"):
    HumanEval(shots_held_out=164)


def test_code_references():
  rec = {r["task_id"]: r for r in HumanEval().records("test")}["HumanEval/38"]
  task = HumanEval(unsafe_sandbox=UNSAFE)
  ref = task.reference(rec)
  assert ref.startswith("```python\n") and ref.endswith("\n```")
  assert "def decode_cyclic" in ref and task.correct(rec, ref)
  code = small()
  rec = code.records("train")[0]
  assert code.reference(rec) == f"```python\n{rec['solution'].rstrip()}\n```"
  assert code.correct(rec, code.reference(rec))
  assert MBPP().reference({"solution": ""}) is None
  assert MBPP().reference({"solution": "def f():\n    return 1\n"}) == \
      "```python\ndef f():\n    return 1\n```"


def test_humaneval_splits_and_sandbox():
  task = HumanEval(shots_held_out=0, unsafe_sandbox=UNSAFE)
  splits = {s: task.records(s) for s in SPLITS}
  ids = {s: {r["task_id"] for r in recs} for s, recs in splits.items()}
  assert sum(map(len, ids.values())) == 164 and len(set().union(*ids.values())) == 164
  assert 0.25 < len(ids["test"]) / 164 < 0.55 and ids["val"]
  assert HumanEval(shots_held_out=0).records("test") == splits["test"]
  assert len(HumanEval(shots_held_out=0, val_pct=0, test_pct=100).records("test")) == 164
  every = {r["task_id"]: r for recs in splits.values() for r in recs}
  rec = every["HumanEval/0"]
  assert task.messages(rec) == [{"role": "user", "content": rec["question"]}]
  assert rec["prompt"].rstrip() in rec["question"] and "```python" in rec["question"]
  # a body continues the prompt; a whole function redefines it (helpers of the prompt stay)
  assert task.reward(rec, rec["canonical_solution"]) == 1.0
  assert task.correct(rec, "    return False\n") is False
  cyclic = every["HumanEval/38"]  # decode_cyclic calls the prompt's encode_cyclic
  whole = cyclic["prompt"] + cyclic["canonical_solution"]
  assert task.correct(cyclic, fenced(whole)) is True
  assert task.correct(cyclic, fenced(whole.replace("encode_cyclic(encode_cyclic(s))", "s")))\
      is False
  # a body written flush left is indented under the stub
  assert task.correct(every["HumanEval/2"], "return number % 1.0") is True
  slow = HumanEval(shots_held_out=0, timeout_s=1.0, unsafe_sandbox=UNSAFE)
  assert slow.reward(rec, "    while True:\n        pass\n") == 0.0
  with pytest.raises(TaskError, match="test_pct"):
    HumanEval(shots_held_out=0, test_pct=95).records("test")


def write_jsonl(path, rows) -> str:
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


MBPP_ROW = {"task_id": 2, "text": "Write a function to add two numbers.",
            "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
            "test_setup_code": ""}


def test_mbpp_jsonl(tmp_path):
  rows = [dict(MBPP_ROW, task_id=i, test_list=[f"assert add({i}, 1) == {i + 1}"])
          for i in range(30)]
  train = write_jsonl(tmp_path / "train.jsonl", rows)
  setup_row = {"task_id": 7, "text": "Return the area of a Box.", "code":
               "def area(b):\n    return b.w * b.h", "test_list": ["assert area(Box(2, 3)) == 6"],
               "test_setup_code": "class Box:\n    def __init__(self, w, h):\n"
                                  "        self.w, self.h = w, h"}
  sanitized = {"task_id": 8, "prompt": "Return the square root of x.",
               "code": "def root(x):\n    return math.sqrt(x)",
               "test_imports": ["import math"], "test_list": ["assert root(9) == 3"]}
  test = write_jsonl(tmp_path / "test.jsonl", [MBPP_ROW, setup_row, sanitized])
  task = MBPP(train_path=train, test_path=test, unsafe_sandbox=UNSAFE)
  tr, va = task.records("train"), task.records("val")
  assert len(tr) + len(va) == 30 and va and not {r["task_id"] for r in tr} & {
      r["task_id"] for r in va}
  add, box, root = task.records("test")
  assert "assert add(1, 2) == 3" in add["question"] and "add(-1, 1)" not in add["question"]
  assert root["question"].startswith("Return the square root of x.")
  assert task.reward(add, fenced(MBPP_ROW["code"])) == 1.0
  assert task.reward(add, fenced("def add(a, b):\n    return a - b")) == 0.0
  assert task.correct(box, fenced(setup_row["code"])) is True
  assert task.correct(root, fenced(sanitized["code"])) is True

  bad = write_jsonl(tmp_path / "bad.jsonl", [MBPP_ROW, "{oops"])
  with pytest.raises(TaskError, match="bad.jsonl:2"):
    MBPP(train_path=bad, test_path=test).records("train")
  missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "t"}])
  with pytest.raises(TaskError, match="missing.jsonl:1: missing key"):
    MBPP(train_path=train, test_path=missing).records("test")
  empty = write_jsonl(tmp_path / "empty.jsonl", [dict(MBPP_ROW, test_list=[])])
  with pytest.raises(TaskError, match="record 1: `test_list`"):
    MBPP(train_path=train, test_path=empty).records("test")
  with pytest.raises(TaskError, match="needs a test file"):
    MBPP(train_path=train).records("test")


def small(**kw) -> ProceduralCode:
  return ProceduralCode(**{"max_level": 3, "train_size": 300, "val_size": 60, "test_size": 60,
                           "unsafe_sandbox": UNSAFE, **kw})


def test_procedural_splits_are_disjoint_and_reproducible():
  task = small()
  splits = {s: task.records(s) for s in SPLITS}
  assert {s: len(r) for s, r in splits.items()} == {"train": 300, "val": 60, "test": 60}
  for field in ("task_id", "question"):
    sets = {s: {r[field] for r in recs} for s, recs in splits.items()}
    assert all(len(sets[s]) == len(splits[s]) for s in SPLITS)  # no repeats within a split
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
  assert {r["level"] for r in splits["train"]} == {1, 2, 3}
  _procedural.cache_clear()
  assert small().records("test") == splits["test"]
  assert small(train_size=50, test_size=20).records("test") == splits["test"][:20]
  other = {s: {r["task_id"] for r in small(seed=1).records(s)} for s in SPLITS}
  assert other["test"] != {r["task_id"] for r in splits["test"]}
  assert not other["test"] & {r["task_id"] for r in splits["train"]}  # across seeds too
  assert {r["level"] for r in ProceduralCode(max_level=1, train_size=40, val_size=5,
                                             test_size=5).records("train")} == {1}


def test_procedural_references_pass_and_wrong_answers_fail():
  recs = small().records("train")
  for rec in recs:  # every reference passes its tests, and the tests tell functions apart
    exec(rec["solution"] + "\n" + "\n".join(rec["tests"]), {})  # pylint: disable=exec-used
    with pytest.raises(AssertionError):
      exec(f"def {rec['entry_point']}(*args):\n    return args[0]\n"  # pylint: disable=exec-used
           + "\n".join(rec["tests"]), {})
  task = small()
  rng = random.Random(0)
  sample = [_make_problem(t, rng)[1]() for t in sorted(TEMPLATES)[::3]]
  for rec in sample:  # through the sandbox: the reference passes, a changed one fails
    assert task.reward(rec, fenced(rec["solution"])) == 1.0, rec["task_id"]
    assert task.correct(rec, rec["solution"])  # unfenced
    wrong = re.sub(r"return (.*)", r"return [\1]", rec["solution"])
    assert task.reward(rec, fenced(wrong)) == 0.0, rec["task_id"]
  rec = sample[0]
  assert rec["question"].startswith(f"Write a Python function `{rec['entry_point']}(")
  assert rec["tests"][0].split(" == ")[0][len("assert "):] in rec["question"]


def test_make_task_and_errors():
  assert isinstance(make_task("code", {"max_level": 1, "timeout_s": 2.0}), ProceduralCode)
  assert isinstance(make_task("humaneval", {"shots_held_out": 0, "test_pct": 50}), HumanEval)
  assert isinstance(make_task("mbpp", {"train_path": "a", "test_path": "b"}), MBPP)
  for name in ("code", "humaneval", "mbpp"):
    with pytest.raises(TaskError, match="has no setting"):
      make_task(name, {"levels": 2})
  with pytest.raises(TaskError, match="max_level 9"):
    ProceduralCode(max_level=9)
  with pytest.raises(TaskError, match="split 'dev'"):
    small().records("dev")


def test_draw_splits_runs_out_of_problems():
  def draw(rng):
    n = rng.randrange(40)
    return n, lambda: {"n": n}

  splits = draw_splits(draw, 0, {"train": 5, "val": 2, "test": 2}, "toy", 15, 15)
  assert sorted(len(splits[s]) for s in SPLITS) == [2, 2, 5]
  with pytest.raises(TaskError, match=r"toy: too few distinct problems for test \(\d+ of 50\)"):
    draw_splits(draw, 0, {"train": 5, "val": 2, "test": 50}, "toy", 15, 15)
