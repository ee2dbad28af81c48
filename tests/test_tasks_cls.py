"""Classification task: the reference completion continues the prefilled answer."""

from __future__ import annotations

from t2jax.tasks.cls import ANSWER_PREFIX, Classification, extract_label


def test_reference_continues_the_prefill():
  task = Classification()
  for label in task.labels:
    rec = {"question": "What is 2 + 2?", "label": label}
    assert task.reference(rec) == f"{label}}}"
    assert extract_label(ANSWER_PREFIX + task.reference(rec)) == label
    assert task.correct(rec, task.reference(rec)) and task.reward(rec, task.reference(rec)) == 1.0
