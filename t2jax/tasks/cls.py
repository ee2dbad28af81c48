"""Classification task: which source task does a prompt come from? It trains the classification
expert of the two-pass `cls_expert` strategy (t2jax/adapt.py), and `classification_messages` is
the one place that writes the pass-1 prompt, so the expert trains on exactly what it sees there.

Records are prompts drawn ONLY from each source task's TRAIN split (the official code trains its
classifier on test splits, ARC-Challenge test among them; we never read a source's val or test),
each labelled with its source name. They are split into disjoint cls train/val/test by a hash
of the prompt text (the split of a prompt never depends on the seed), with the same count per
label in every split. The label set is the sources plus "other", which no record carries: it is
the answer for prompts that fit no expert, and routes them to the base model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Mapping, Sequence

from t2jax.tasks.base import Record, TaskError, check_split

OTHER = "other"
# What each known label means to the classifier (after the official prompt's guidelines).
LABEL_DESCRIPTIONS = {
    "code": "writing or fixing programs and functions in a programming language",
    "math": "arithmetic and word problems whose answer is a number",
    "reasoning": "multiple-choice questions with a list of options: logic, science, common sense",
    OTHER: "anything that fits none of the above",
}
CLASSIFY_INSTRUCTION = (
    "Classify the question below into exactly one of these categories:\n{categories}\n"
    "Choose the category of the skill the question mainly needs. Answer with only "
    "\\boxed{{CATEGORY}}, where CATEGORY is one of: {names}.\n\n"
    "Question:\n{question}")
# Opens the assistant's answer, prefilled: the model only has to name the label (pass 1 scores
# each label's tokens after it; RL rollouts sample them), never to find the format first.
ANSWER_PREFIX = "\\boxed{"
_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")


# The official code's dispatch prompt (SakanaAI/self-adaptive-llms, utils.classify_samples),
# word for word: a system turn, the question as the user turn, and a free-running reply read
# for "\boxed{...}". Kept for the fidelity switch (configs/adapt.py: dispatch_prompt).
OFFICIAL_LABELS = ("code", "math", "reasoning", OTHER)
OFFICIAL_INSTRUCTION = """
    # Analyze the given question and classify it into one of four categories: 'code', 'math', 'reasoning' or 'other'. Follow these guidelines:

    1. Code: Questions asking for programming solutions, functions, algorithms. Often includes specific programming terms, language syntax, or data structures.
    2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes numbers, equations, or mathematical operations.
    3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical analysis of information. Often presents statements that need evaluation based on general understanding. 
    4. Other: Questions not clearly fit into above categories.

    Instructions:
    - Consider the primary focus, skills, and knowledge required to answer the question.
    - If a question spans multiple categories, choose the most dominant one.
    - Provide your final classification within \\boxed{} notation. Example: \\boxed{reasoning}

    Format your response as follows:
    Classification: \\boxed{category}
    """
# ours: the request and the question in one user turn; official: as above
PROMPT_STYLES = ("ours", "official")


def classification_messages(question: str, labels: Sequence[str],
                            style: str = "ours") -> list[dict[str, str]]:
  """The chat turns that ask for the label of `question` (pass 1 of every two-pass strategy and
  the cls task's prompt), ending in the assistant turn prefilled up to the label: ANSWER_PREFIX
  (ours), or "Classification: \\boxed{" (official: the reply format its prompt asks for),
  which the model continues with `label}`. Both are scored, never sampled, in pass 1."""
  if style == "official":
    if sorted(labels) != sorted(OFFICIAL_LABELS):
      raise ValueError(f"the official dispatch prompt names the labels {list(OFFICIAL_LABELS)} "
                       f"only; these experts give {list(labels)}. Use dispatch_prompt='ours'.")
    return [{"role": "system", "content": OFFICIAL_INSTRUCTION},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "Classification: " + ANSWER_PREFIX}]
  if style != "ours":
    raise ValueError(f"dispatch prompt style {style!r} is unknown; use one of {PROMPT_STYLES}.")
  categories = "\n".join(f"- {lab}: {LABEL_DESCRIPTIONS.get(lab, lab)}" for lab in labels)
  text = CLASSIFY_INSTRUCTION.format(categories=categories, names=", ".join(labels),
                                     question=question)
  return [{"role": "user", "content": text}, {"role": "assistant", "content": ANSWER_PREFIX}]


def extract_label(completion: str) -> str | None:
  """The label in the last \\boxed{...} of an answer, lower-cased; None without one. A
  completion of the prefilled turn is read after ANSWER_PREFIX, so "math}" reads as math."""
  found = _BOXED.findall(completion) or _BOXED.findall(ANSWER_PREFIX + completion)
  return found[-1].strip().lower() if found else None


def question_text(messages: Sequence[Mapping[str, str]]) -> str:
  """The user content of a task's chat turns (the last user turn): what is classified."""
  users = [m["content"] for m in messages if m.get("role") == "user"]
  if not users:
    raise TaskError("a source task's messages hold no user turn to classify.")
  return users[-1]


def parse_sources(sources: str) -> list[str]:
  names = [s.strip() for s in sources.split(",") if s.strip()]
  if not names or len(set(names)) != len(names) or OTHER in names:
    raise TaskError(f"cls sources must be distinct task names (not {OTHER!r}), comma-separated; "
                    f"got {sources!r}.")
  return names


def _hash_bucket(text: str) -> float:
  return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / float(16 ** 12)


@dataclasses.dataclass(frozen=True)
class Classification:
  name: str = "cls"
  sources: str = "math,code,reasoning"  # registered task names; each one is a label
  source_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name → task_args
  per_source: int = 200  # records per label, over the three cls splits
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0  # which train prompts of each source are drawn (not which cls split they go to)
  reward_correct: float = 1.0
  reward_wrong: float = -1.0  # ±1 as the math task (the official reward)

  def __post_init__(self):
    parse_sources(self.sources)
    if not (0 <= self.val_fraction and 0 <= self.test_fraction
            and self.val_fraction + self.test_fraction < 1):
      raise TaskError(f"cls val_fraction {self.val_fraction} and test_fraction "
                      f"{self.test_fraction} must be >= 0 and sum to < 1.")
    if self.per_source < 1:
      raise TaskError(f"cls per_source must be >= 1; got {self.per_source}.")
    from t2jax.tasks import registered  # pylint: disable=import-outside-toplevel

    # settings of a task that is not a source are unused (configs/cls.py names every expert's
    # task, so --config.task_args.sources=math,code works); an unknown task name is a typo
    unknown = sorted(set(self.source_args) - set(registered()))
    if unknown:
      raise TaskError(f"cls source_args names {unknown}, which are not tasks; use some of "
                      f"{registered()}.")

  @property
  def labels(self) -> list[str]:
    return parse_sources(self.sources) + [OTHER]

  def _counts(self) -> dict[str, int]:
    test = round(self.per_source * self.test_fraction)
    val = round(self.per_source * self.val_fraction)
    return {"train": self.per_source - val - test, "val": val, "test": test}

  @functools.cached_property
  def _splits(self) -> dict[str, list[Record]]:
    import numpy as np  # pylint: disable=import-outside-toplevel

    from t2jax import tasks  # pylint: disable=import-outside-toplevel

    counts = self._counts()
    bounds = (self.test_fraction, self.test_fraction + self.val_fraction)
    out: dict[str, list[Record]] = {s: [] for s in counts}
    for label in parse_sources(self.sources):
      source = tasks.make_task(label, dict(self.source_args.get(label) or {}))
      pool = list(source.records("train"))  # never val/test: those judge the experts
      texts = list(dict.fromkeys(question_text(source.messages(r)) for r in pool))
      order = np.random.default_rng([self.seed, *label.encode()]).permutation(len(texts))
      per_split: dict[str, list[str]] = {s: [] for s in counts}
      for i in order:
        bucket = _hash_bucket(texts[i])
        split = "test" if bucket < bounds[0] else "val" if bucket < bounds[1] else "train"
        if len(per_split[split]) < counts[split]:
          per_split[split].append(texts[i])
      for split, got in per_split.items():
        if len(got) < counts[split]:
          raise TaskError(f"cls source {label!r} has {len(texts)} distinct train prompts: too "
                          f"few for {counts[split]} cls {split} records (per_source "
                          f"{self.per_source}); lower per_source.")
        out[split] += [{"question": q, "label": label} for q in got]
    return out

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    return self._splits[split]

  def messages(self, record: Record) -> list[dict[str, str]]:
    return classification_messages(record["question"], self.labels)

  def correct(self, record: Record, completion: str) -> bool:
    return extract_label(completion) == record["label"]

  def reward(self, record: Record, completion: str) -> float:
    return self.reward_correct if self.correct(record, completion) else self.reward_wrong

  def reference(self, record: Record) -> str:
    """The right continuation of the prefilled ANSWER_PREFIX: 'label}'."""
    return f"{record['label']}}}"
