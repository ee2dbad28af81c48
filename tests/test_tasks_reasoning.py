"""Reasoning tasks: choice extraction, ARC JSONL layouts and errors, procedural questions that
an independent solver agrees with, spread evenly over A-D, in disjoint splits."""

from __future__ import annotations

import collections
import json
import re

import pytest

from t2jax.tasks import make_task
from t2jax.tasks.base import TaskError
from t2jax.tasks.reasoning import ARC, ProceduralReasoning, extract_choice, extract_option

SPLITS = ("train", "val", "test")


@pytest.mark.parametrize("text,want", [
    ("The answer is (B).", "B"),
    ("so the answer is (c)", "C"),
    ("Answer: d", "D"),
    ("answer: a, because it floats", "A"),
    ("The correct answer is: **(B)**", "B"),
    ("The answer is (A). Wait, no: the answer is (C).", "C"),  # the last announced wins
    ("The answer is (B). Option A is wrong because it is too small.", "B"),
    ("I pick option C.", "C"),
    ("(A) 5, (B) 6 ... so B", "B"),  # a lone letter at the end
    ("(C) is right: it grows.", "C"),  # the last bracketed letter
    ("**D**", "D"),
    ("b", "B"),
    ("The answer is a dog.", None),  # an article, not an option
    ("The answer is (E).", None),  # not a label
    ("no choice made here", None),
])
def test_extract_choice(text, want):
  assert extract_choice(text) == want


UNITS = ["288 minutes", "300 minutes", "5 minutes", "17280 minutes"]
LENGTHS = ["6 metres", "16 metres", "60 metres", "1 metres"]
SYLLOGISM = ["All bloox are gruz.", "No bloox are gruz.", "All gruz are bloox.",
             "Some bloox are gruz."]


@pytest.mark.parametrize("text,choices,want", [
    ("The answer is 300 minutes.", UNITS, 1),
    ("The answer is 288.", UNITS, 0),  # the part that tells the options apart
    ("The answer is 16 metres.", LENGTHS, 1),  # not '6 metres' inside it
    ("The answer is 6 metres, not 16 metres.", LENGTHS, 0),  # the first named
    ("I'd say 60 metres. Final answer: 1 metres", LENGTHS, 3),  # after the last 'answer'
    ("The answer is: no bloox are gruz", SYLLOGISM, 1),  # case and full stop do not matter
    ("The answer is some.", SYLLOGISM, None),  # no option is named
    ("The answer is 2880 minutes.", UNITS, None),
    ("The answer is Ana", ["Ben", "Ana", "Cleo", "Dev"], 1),
    ("The answer is Anabel", ["Ben", "Ana", "Cleo", "Dev"], None),
])
def test_extract_option(text, choices, want):
  assert extract_option(text, choices) == want


def test_extract_choice_labels():
  assert extract_choice("The answer is (E).", "ABCDE") == "E"
  assert extract_choice("The answer is (C). (A) and (B) fail.", "AB") == "B"


def write_jsonl(path, rows) -> str:
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


HF_ROW = {"id": "q1", "question": "Which is a gas?",
          "choices": {"text": ["rock", "steam", "ice", "wood"], "label": ["A", "B", "C", "D"]},
          "answerKey": "B"}


def test_arc_layouts_prompt_and_reward(tmp_path):
  numeric = {"id": "q2", "question": "Which is liquid?",
             "choices": {"text": ["water", "salt", "sand"], "label": ["1", "2", "3"]},
             "answerKey": "1"}
  flat = {"question": "Which melts?", "choices": ["iron", "stone", "ice", "glass", "clay"],
          "answerKey": "C"}
  ai2 = {"id": "q4", "question": {"stem": "Which grows?", "choices": [
      {"text": "a plant", "label": "A"}, {"text": "a rock", "label": "B"}]}, "answerKey": "A"}
  test = write_jsonl(tmp_path / "test.jsonl", [HF_ROW, numeric, flat, ai2])
  train = write_jsonl(tmp_path / "train.jsonl", [dict(HF_ROW, id=f"t{i}") for i in range(40)])
  task = ARC(train_path=train, test_path=test)
  gas, liquid, melts, grows = task.records("test")
  assert [r["answer"] for r in (gas, liquid, melts, grows)] == ["B", "A", "C", "A"]
  assert liquid["choices"] == ["water", "salt", "sand"]
  assert task.messages(gas) == [{"role": "user", "content": gas["question"]}]
  assert gas["question"].startswith("Which is a gas?\n\n(A) rock\n(B) steam\n(C) ice\n(D) wood")
  assert gas["question"].endswith("End with 'The answer is' and the letter of your choice.")
  assert "(X)" not in gas["question"]  # the base model copied a placeholder letter
  assert task.reward(gas, "Steam is water vapour. The answer is (B).") == 1.0
  assert task.reward(gas, "The answer is (A).") == 0.0
  assert task.correct(melts, "the answer is (e)") is False and task.correct(melts, "(c)")
  assert not task.correct(grows, "The answer is (C).")  # only two options
  tr, va = task.records("train"), task.records("val")
  assert len(tr) + len(va) == 40 and va and not {r["id"] for r in tr} & {r["id"] for r in va}


def test_arc_errors(tmp_path):
  test = write_jsonl(tmp_path / "test.jsonl", [HF_ROW])
  bad = write_jsonl(tmp_path / "bad.jsonl", [HF_ROW, "", "[1, 2"])
  with pytest.raises(TaskError, match="bad.jsonl:3: not valid JSON"):
    ARC(train_path=bad, test_path=test).records("train")
  missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "choices": ["a", "b"]}])
  with pytest.raises(TaskError, match="missing.jsonl:1: missing key"):
    ARC(test_path=missing).records("test")
  for row, match in [(dict(HF_ROW, answerKey="E"), "record 2: answerKey 'E'"),
                     (dict(HF_ROW, choices="abcd"), "record 2: `choices` must be"),
                     (dict(HF_ROW, choices={"text": ["a"], "label": ["A", "B"]}),
                      "record 2: `choices` needs")]:
    path = write_jsonl(tmp_path / "one.jsonl", [HF_ROW, row])
    with pytest.raises(TaskError, match=re.escape(match)):
      ARC(test_path=path).records("test")
  with pytest.raises(TaskError, match="needs a train file"):
    ARC(test_path=test).records("val")


_MORE = {"taller": "tallest", "older": "oldest", "faster": "fastest", "heavier": "heaviest",
         "richer": "richest"}
_LESS = {"shorter": "shortest", "younger": "youngest", "slower": "slowest",
         "lighter": "lightest", "poorer": "poorest"}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FACTORS = {("centimetres", "metres"): 100, ("metres", "kilometres"): 1000,
            ("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("grams", "kilograms"): 1000,
            ("hours", "days"): 24, ("days", "weeks"): 7, ("millilitres", "litres"): 1000,
            ("millimetres", "centimetres"): 10, ("months", "years"): 12}


_OPPOSITE = {a: b for pair in [("hot", "cold"), ("up", "down"), ("wet", "dry"), ("win", "lose"),
                               ("buy", "sell"), ("true", "false"), ("big", "small"),
                               ("fast", "slow"), ("open", "closed"), ("day", "night")]
             for a, b in (pair, pair[::-1])}


# a few facts of each knowledge family, written out independently of tasks/reasoning_facts.py
_TOOL = {"cut paper": "scissors", "tell the time": "clock", "unlock a door": "key",
         "boil water": "kettle", "reach a high shelf": "ladder", "eat soup": "spoon"}
_SOUND = {"cow": "moo", "duck": "quack", "cat": "meow", "bee": "buzz", "lion": "roar"}
_BABY = {"cat": "kitten", "frog": "tadpole", "sheep": "lamb", "kangaroo": "joey",
         "dog": "puppy"}
_COLOUR = {"snow": "white", "a banana": "yellow", "grass": "green", "coal": "black",
           "a carrot": "orange"}


def _known(stem: str) -> str | None:
  for pattern, table in ((r"What do you use to (.+)\?", _TOOL),
                         (r"What sound does a (\w+) make\?", _SOUND),
                         (r"What is a baby (\w+) called\?", _BABY),
                         (r"What colour is (.+)\?", _COLOUR)):
    if m := re.fullmatch(pattern, stem):
      return table.get(m[1])
  for pattern, table in ((r"Which animal says '(.+)'\?", _SOUND),
                         (r"Which animal's baby is called an? (\w+)\?", _BABY)):
    if m := re.fullmatch(pattern, stem):
      return {v: k for k, v in table.items()}.get(m[1])
  return None


def solve(stem: str, choices: list[str]) -> str | None:
  """The right option's text, worked out from the stem alone; None for kinds not solved here."""
  if m := re.fullmatch(r"Today is (\w+)\. What day of the week (will it be in|was it) (\d+) "
                       r"days( ago)?\?", stem):
    step = int(m[3]) * (1 if m[2] == "will it be in" else -1)
    return _DAYS[(_DAYS.index(m[1]) + step) % 7]
  if m := re.fullmatch(r"How many (\w+) are there in (\d+) (\w+)\?", stem):
    unit, n, given = m[1], int(m[2]), m[3]
    if (unit, given) in _FACTORS:
      return f"{n * _FACTORS[unit, given]} {unit}"
    return f"{n // _FACTORS[given, unit]} {unit}"
  if m := re.fullmatch(r"(.*) Who is the (second )?(\w+)\?", stem):
    score = collections.Counter()  # how many people each one is known to exceed
    facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", m[1])
    greater = {(a, b) if word in _MORE else (b, a) for a, word, b in facts}
    for _ in range(3):  # transitive closure over 4 people
      greater |= {(a, d) for a, b in greater for c, d in greater if b == c}
    for a, _ in greater:
      score[a] += 1
    ranked = sorted(choices, key=lambda p: -score[p])  # most to least
    rank = 1 if m[2] else 0
    return ranked[rank] if m[3] in _MORE.values() else ranked[::-1][rank]
  if m := re.fullmatch(r"(\w+) is (\w+) than (\w+)\. Who is (\w+)\?", stem):
    more, less = (m[1], m[3]) if m[2] in _MORE else (m[3], m[1])
    return more if m[4] in _MORE else less
  if m := re.fullmatch(r"Which number is the (largest|smallest)\?", stem):
    return str((max if m[1] == "largest" else min)(int(c) for c in choices))
  if m := re.fullmatch(r"What is the opposite of '(\w+)'\?", stem):
    return _OPPOSITE.get(m[1])
  if m := re.fullmatch(r"Which of these numbers is (not )?(even|a prime number)\?", stem):
    has = {"even": lambda n: n % 2 == 0,
           "a prime number": lambda n: all(n % d for d in range(2, n))}[m[2]]
    (right,) = [c for c in choices if has(int(c)) != bool(m[1])]
    return right
  return _known(stem)


def small(**kw) -> ProceduralReasoning:
  return ProceduralReasoning(**{"train_size": 400, "val_size": 80, "test_size": 80, **kw})


def test_procedural_answers_are_right_and_uniform():
  task = small(train_size=800)  # enough of each of the 12 families for the solver
  recs = task.records("train")
  solved = collections.Counter()
  for rec in recs:
    got = solve(rec["stem"], rec["choices"])
    if got is not None:
      assert got == rec["choices"]["ABCD".index(rec["answer"])], rec["question"]
      solved[rec["kind"]] += 1
    assert len(set(rec["choices"])) == 4
    assert task.reward(rec, f"I think so. The answer is ({rec['answer']}).") == 1.0
    wrong = "ABCD"[("ABCD".index(rec["answer"]) + 1) % 4]
    assert task.reward(rec, f"The answer is ({wrong}).") == 0.0
  assert {"weekday", "conversion", "ordering", "odd_one_out", "comparison", "extremes",
          "opposite", "uses", "sounds", "young", "colours"} <= set(solved)
  assert min(solved.values()) >= 3
  letters = collections.Counter(r["answer"] for r in recs)
  assert set(letters) == set("ABCD") and all(140 <= n <= 260 for n in letters.values())
  assert {r["kind"] for r in recs} == {"ordering", "weekday", "syllogism", "conversion",
                                       "odd_one_out", "comparison", "extremes", "opposite",
                                       "uses", "sounds", "young", "colours"}


def test_procedural_splits_are_disjoint_and_reproducible():
  splits = {s: small().records(s) for s in SPLITS}
  assert {s: len(r) for s, r in splits.items()} == {"train": 400, "val": 80, "test": 80}
  for field in ("id", "question"):
    sets = {s: {r[field] for r in recs} for s, recs in splits.items()}
    assert all(len(sets[s]) == len(splits[s]) for s in SPLITS)
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
  assert small().records("test") == splits["test"]
  assert small(train_size=10, test_size=30).records("test") == splits["test"][:30]
  other = small(seed=3).records("test")
  assert other != splits["test"]
  assert not {r["id"] for r in other} & {r["id"] for r in splits["train"]}
  weekdays = small(kinds="weekday", train_size=20).records("train")
  assert {r["kind"] for r in weekdays} == {"weekday"}


def test_make_task_and_errors():
  assert isinstance(make_task("reasoning", {"kinds": "ordering", "seed": 1}),
                    ProceduralReasoning)
  assert isinstance(make_task("arc", {"train_path": "a", "test_path": "b"}), ARC)
  for name in ("reasoning", "arc"):
    with pytest.raises(TaskError, match="has no setting"):
      make_task(name, {"level": 2})
  with pytest.raises(TaskError, match=r"kinds \['riddles'\]"):
    ProceduralReasoning(kinds="ordering,riddles")
  with pytest.raises(TaskError, match="split 'dev'"):
    small().records("dev")


def test_prefilled_answer_and_references(tmp_path):
  test = write_jsonl(tmp_path / "test.jsonl", [HF_ROW])
  for task in (small(), ARC(test_path=test)):
    rec = task.records("test")[0]
    assert task.reference(rec) == f"The answer is ({rec['answer']})."
    assert task.correct(rec, task.reference(rec))
  prefix = "The answer is ("
  for task in (small(answer_prefix=prefix), ARC(test_path=test, answer_prefix=prefix)):
    rec = task.records("test")[0]
    assert task.messages(rec) == [{"role": "user", "content": rec["question"]},
                                  {"role": "assistant", "content": prefix}]
    assert task.reference(rec) == f"{rec['answer']})."
    assert task.reward(rec, task.reference(rec)) == 1.0
    assert task.correct(rec, f"{rec['answer']}) because it fits.")
    assert task.correct(rec, rec["answer"])  # one new token: the letter alone
    wrong = "ABCD"[("ABCD".index(rec["answer"]) + 1) % 4]
    assert not task.correct(rec, f"{wrong}).")
    assert not task.correct(rec, "X).")  # a placeholder names no option
  other = small(answer_prefix="Answer: ")
  rec = other.records("test")[0]
  assert other.correct(rec, other.reference(rec))


def test_distractors_give_no_positional_cue():
  recs = small(kinds="weekday,conversion", train_size=300, val_size=20, test_size=20,
               seed=5).records("train")
  options = {}
  for rec in small(kinds="weekday,conversion", train_size=300, val_size=20,
                   test_size=20).records("train") + recs:  # two seeds, one option set a question
    assert options.setdefault(rec["stem"], sorted(rec["choices"])) == sorted(rec["choices"])
  runs = 0
  for rec in recs:
    right = rec["choices"]["ABCD".index(rec["answer"])]
    if rec["kind"] == "weekday":  # once the answer was always second of four consecutive days
      days = sorted(_DAYS.index(c) for c in rec["choices"])
      runs += any(all((d + i) % 7 in days for i in range(4)) for d in days)
    else:  # once the answer always had answer ± 1 (or × 10) beside it
      value = int(right.split()[0])
      values = {int(c.split()[0]) for c in rec["choices"]}
      assert not {value - 1, value + 1} <= values
  assert runs < 0.3 * sum(r["kind"] == "weekday" for r in recs)


def test_text_answer_format(tmp_path):
  """answer_format="text": options as a plain list, the reply writes its choice out; the same
  problems (ids, keys) as the letter format."""
  letter, text = small(), small(answer_format="text", answer_prefix="The answer is")
  for a, b in zip(letter.records("test"), text.records("test")):
    assert (a["id"], a["choices"], a["answer"]) == (b["id"], b["choices"], b["answer"])
    right = b["choices"]["ABCD".index(b["answer"])]
    assert b["question"] == b["stem"] + "\n\n" + "\n".join(f"- {c}" for c in b["choices"]) + (
        "\n\nEnd with 'The answer is' and your choice, written as in the list.")
    assert text.reference(b) == f" {right.rstrip('.')}."
    assert text.correct(b, text.reference(b)) and not text.correct(b, f" ({b['answer']}).")
    others = [c for c in b["choices"] if c != right]
    assert not text.correct(b, f" {others[0]}") and not text.correct(b, " I do not know.")
  test = write_jsonl(tmp_path / "test.jsonl", [HF_ROW])
  gas = ARC(test_path=test, answer_format="text").records("test")[0]
  assert "\n- steam\n" in gas["question"] and "(B)" not in gas["question"]
  task = ARC(test_path=test, answer_format="text")
  assert task.reference(gas) == "The answer is steam." and task.correct(gas, "Answer: Steam")
  with pytest.raises(TaskError, match="answer_format 'word' is unknown"):
    small(answer_format="word")


def test_reward_of_a_reply_naming_no_option():
  """reward_no_choice scores a reply that names none of the options apart from a wrong one;
  unset, both get reward_wrong. Accuracy is the same either way."""
  plain = small(answer_format="text", answer_prefix="The answer is")
  shaped = small(answer_format="text", answer_prefix="The answer is", reward_no_choice=-1.0)
  rec = shaped.records("test")[0]
  wrong = next(c for c in rec["choices"] if c != rec["choices"]["ABCD".index(rec["answer"])])
  replies = {"right": shaped.reference(rec), "wrong": f" {wrong}", "none": " I do not know."}
  assert {k: shaped.reward(rec, v) for k, v in replies.items()} == {
      "right": 1.0, "wrong": 0.0, "none": -1.0}
  assert {k: plain.reward(rec, v) for k, v in replies.items()} == {
      "right": 1.0, "wrong": 0.0, "none": 0.0}
  assert all(shaped.correct(rec, v) == plain.correct(rec, v) for v in replies.values())
