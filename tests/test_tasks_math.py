"""Math tasks: answer extraction, reproducible disjoint splits, word problems an independent
solver agrees with, GSM8K JSONL errors, reference completions."""

from __future__ import annotations

import json
import re

import pytest

from t2jax.tasks.base import TaskError
from t2jax.tasks import make_task
from t2jax.tasks.math import GSM8K, Arithmetic, WordProblems, extract_answer


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", 42.0),
    ("2 + 3 = 5", 5.0),
    ("It costs $1,234.50 in total", 1234.5),
    ("#### 1,000", 1000.0),
    ("We get \\boxed{17} apples", 17.0),
    ("Answer: -7 degrees, since 3 - 10 = -7", -7.0),
    ("first 12, then the answer is 30 cookies. Check: 30", 30.0),
    ("the answer is 8 (not 9)", 8.0),
    ("So, the answer is 10 + 16 = 26.", 26.0),  # step by step: the equation's result
    ("The answer is 3 - 10 = -7 degrees", -7.0),
    ("The answer is 7 because 12 = 5 + 7", 7.0),  # an equation after the answer is not it
    ("The answer is 2 * 3.", 2.0),  # no "=": the first number stands
    ("no digits here", None),
])
def test_extract_answer(text, want):
  assert extract_answer(text) == want


def test_arithmetic_splits_are_disjoint_and_reproducible():
  task = Arithmetic(level=2)
  splits = {s: task.records(s) for s in ("train", "val", "test")}
  questions = {s: {r["question"] for r in recs} for s, recs in splits.items()}
  assert not questions["train"] & questions["test"]
  assert not questions["train"] & questions["val"]
  assert not questions["val"] & questions["test"]
  assert sum(map(len, splits.values())) == 90 * 90
  assert 0.05 < len(splits["test"]) / (90 * 90) < 0.15
  assert Arithmetic(level=2).records("test") == splits["test"]
  rec = splits["test"][0]
  a, op, b = rec["question"][len("What is "):-1].split()
  assert rec["target"] == int(a) + int(b) and op == "+"


def test_arithmetic_reward_and_messages():
  task = Arithmetic(level=1)
  rec = {"question": "What is 3 + 4?", "target": 7}
  assert task.reward(rec, "3 + 4 = 7. The answer is 7.") == 1.0
  assert task.reward(rec, "The answer is 8.") == -1.0
  assert task.messages(rec)[-1] == {"role": "user", "content": "What is 3 + 4?"}
  with pytest.raises(TaskError, match="level 9"):
    Arithmetic(level=9)
  with pytest.raises(TaskError, match="split 'dev'"):
    task.records("dev")


def test_gsm8k_jsonl(tmp_path):
  train = tmp_path / "train.jsonl"
  train.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"work\n#### {i},000"})
                             for i in range(50)) + "\n")
  test = tmp_path / "test.jsonl"
  test.write_text(json.dumps({"question": "t", "answer": "#### $12"}) + "\n")
  task = GSM8K(train_path=str(train), test_path=str(test))
  assert task.records("test") == [{"question": "t", "target": 12.0}]
  tr, va = task.records("train"), task.records("val")
  assert len(tr) + len(va) == 50 and not {r["question"] for r in tr} & {r["question"] for r in va}
  assert {r["target"] for r in tr + va} == {i * 1000.0 for i in range(50)}
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "a", "answer": "#### 1"}) + "\n{oops\n")
  with pytest.raises(TaskError, match="bad.jsonl:2"):
    GSM8K(train_path=str(bad), test_path=str(test)).records("train")
  with pytest.raises(TaskError, match="does not exist"):
    GSM8K(train_path=str(tmp_path / "nope.jsonl"), test_path=str(test)).records("train")
  with pytest.raises(TaskError, match="needs a train file"):
    GSM8K(test_path=str(test)).records("train")
  missing = tmp_path / "missing.jsonl"
  missing.write_text(json.dumps({"question": "a"}) + "\n")
  with pytest.raises(TaskError, match="missing.jsonl:1: missing key"):
    GSM8K(train_path=str(missing), test_path=str(test)).records("train")


def test_references_are_correct_completions(tmp_path):
  task = Arithmetic(level=2)
  rec = task.records("test")[0]
  assert task.reference(rec) == f"The answer is {rec['target']}."
  assert task.reward(rec, task.reference(rec)) == 1.0
  test = tmp_path / "test.jsonl"
  test.write_text(json.dumps({"question": "t", "answer": "#### 2.5"}) + "\n"
                  + json.dumps({"question": "u", "answer": "#### 1,200"}) + "\n")
  half, whole = GSM8K(train_path=str(test), test_path=str(test)).records("test")
  assert GSM8K().reference(half) == "The answer is 2.5."
  assert GSM8K().reference(whole) == "The answer is 1200."
  word = WordProblems(train_size=20, val_size=5, test_size=5)
  for rec in word.records("train"):
    assert word.reference(rec) == f"The answer is {rec['target']}."
    assert word.correct(rec, word.reference(rec))


_WORD_STEPS = [
    (r"\w+ (?:buys|finds) (\d+) more \w+\.", lambda n, b: n + int(b)),
    (r"\w+ gives \w+ (\d+) \w+\.", lambda n, b: n + int(b)),
    (r"\w+ (?:gives|loses|sells) (\d+) \w+(?: to \w+)?\.", lambda n, b: n - int(b)),
    (r"\w+ (?:buys (\d+) packs|gives \w+ (\d+) bags) of \w+ with (\d+)",
     lambda n, k1, k2, m: n + int(k1 or k2) * int(m)),
    (r"\w+ gives \w+ (\d+) bags with (\d+) \w+ in each bag\.",
     lambda n, k, m: n + int(k) * int(m)),
    (r".*(doubles|triples)", lambda n, w: n * (2 if w == "doubles" else 3)),
    (r".*(?:among|into) (\d+)", lambda n, k: n // int(k)),
]


def solve_word(question: str) -> int:
  """The final count of a word problem, read sentence by sentence (an independent solver)."""
  first, *sentences = re.split(r"(?<=\.) ", question)
  total = int(re.search(r"has (\d+)", first)[1])
  for sentence in sentences:
    if sentence.startswith("How many"):
      return total
    for pattern, apply in _WORD_STEPS:
      if m := re.match(pattern, sentence):
        total = apply(total, *m.groups())
        break
    else:
      raise AssertionError(f"unparsed step: {sentence!r}")
  raise AssertionError(f"no question in {question!r}")


def test_word_problems_answers_splits_and_settings():
  task = WordProblems(train_size=300, val_size=60, test_size=60)
  splits = {s: task.records(s) for s in ("train", "val", "test")}
  assert {s: len(r) for s, r in splits.items()} == {"train": 300, "val": 60, "test": 60}
  ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
  assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"]
  assert not ids["val"] & ids["test"]
  for rec in splits["train"]:
    assert rec["target"] == solve_word(rec["question"]) >= 0, rec["question"]
    assert rec["steps"] in (2, 3)
  assert {r["steps"] for r in splits["train"]} == {2, 3}
  assert task.messages(splits["test"][0])[0]["content"].endswith("'The answer is N.'")
  assert task.reward(splits["test"][0], "The answer is -999.") == -1.0
  assert WordProblems(train_size=300, val_size=60, test_size=60).records("test") == \
      splits["test"]
  assert len(WordProblems().records("test")) >= 256
  assert isinstance(make_task("math_word", {"max_steps": 2}), WordProblems)
  assert {r["steps"] for r in WordProblems(max_steps=2, train_size=30, val_size=5,
                                           test_size=5).records("train")} == {2}
  with pytest.raises(TaskError, match="min_steps"):
    WordProblems(min_steps=3, max_steps=2)
