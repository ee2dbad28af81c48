"""Multiple-choice reasoning tasks: ARC-format JSONL and procedural questions (orderings, days
of the week, syllogisms, unit conversions, comparisons, extremes, opposites, odd one out, and
everyday knowledge: tools, animal sounds and young, colours).
Reward: the announced option is the key, named by its letter (answer_format "letter") or
written out (answer_format "text")."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
import string
from typing import Callable, Sequence

from t2jax.tasks import reasoning_facts
from t2jax.tasks.base import (SPLITS, QuestionTask, Record, TaskError, check_split, draw_splits,
                              file_split, read_jsonl)

LETTERS = string.ascii_uppercase
# No placeholder letter: asked for "'The answer is (X).', where X is ...", the base model
# copied "(X)" in 62 of 64 conversion questions. Short: every prompt token is prefilled once
# per rollout.
_ASK = "End with 'The answer is' and the letter of your choice."
_ASK_TEXT = "End with 'The answer is' and your choice, written as in the list."
ANSWER_FORMATS = ("letter", "text")


@functools.lru_cache(maxsize=64)
def _choice_patterns(labels: str) -> tuple[re.Pattern, ...]:
  """The ways a completion names its choice, most explicit first."""
  up, low = f"[{re.escape(labels.upper())}]", f"[{re.escape(labels.lower())}]"
  # '(b)' in any case; a bare capital; a bare small letter only before punctuation or the end,
  # so that 'the answer is a dog' announces nothing.
  letter = rf"(?:\(\s*({up}|{low})\s*\)|\b({up})\b|\b({low})(?=[\s*_]*(?:[.,;:!?)]|$)))"
  verb = r"(?i:\s+(?:is|would be|should be|must be|will be))?[\s*_]*[:=]?[\s*_]*"
  return (
      # 'The answer is (B)', 'Answer: b', 'answer is option C'
      re.compile(r"(?i:answer)" + verb + r"(?i:(?:option|choice)\s+)?[\s*_]*" + letter),
      # 'I pick option C', 'my choice: (d)'; after the above, so that 'the answer is (B);
      # option A is wrong because …' chooses B
      re.compile(r"(?i:option|choice)" + verb + letter),
      # a lone letter ending the text: '… so B.', '**C**', or a small one on a line of its own
      re.compile(rf"(?:^|\s)[*_]*\(?({up})\)?[*_]*[.!]?\s*$"
                 rf"|(?:^|\n)[\s*_]*\(?({low})\)?[*_.!]*\s*$"),
      re.compile(rf"\(\s*({up}|{low})\s*\)"),  # the last '(C)' anywhere
  )


def extract_choice(completion: str, labels: Sequence[str] = "ABCD") -> str | None:
  """The option letter a completion chooses, upper-case, among `labels`: the last announced
  answer ('the answer is (B)', 'Answer: b'), else the last announced option ('option C'),
  else a lone letter at the end ('… so B.'), else the last bracketed one ('(C)'); None if
  there is none. Case-insensitive."""
  for pattern in _choice_patterns("".join(labels)):
    found = [next(g for g in m.groups() if g) for m in pattern.finditer(completion)]
    if found:
      return found[-1].upper()
  return None


def _cores(choices: Sequence[str]) -> list[str]:
  """Each option without the words every option starts or ends with: '288 minutes' of
  ('288 minutes', '300 minutes', …) is '288', so a reply of 'The answer is 288.' names it."""
  words = [text.strip().rstrip(".").split() for text in choices]
  head = 0
  while all(len(w) > head + 1 and w[head] == words[0][head] for w in words):
    head += 1
  tail = 0
  while all(len(w) > head + tail + 1 and w[-1 - tail] == words[0][-1 - tail] for w in words):
    tail += 1
  return [" ".join(w[head:len(w) - tail]) for w in words]


def extract_option(completion: str, choices: Sequence[str]) -> int | None:
  """The option a completion writes out: after its last 'answer', the option whose text (or
  the part of it that differs from the other options: '288' of '288 minutes') starts first;
  whole words, case-insensitive; the longer one where two start together, so '16 metres' is
  never read as '6 metres'. None if no option is written there."""
  found = list(re.finditer(r"(?i)\banswer\b", completion))
  tail = completion[found[-1].end():] if found else completion
  best = None  # (start, -length, index)
  for i, (text, core) in enumerate(zip(choices, _cores(choices))):
    for name in dict.fromkeys((text.strip().rstrip("."), core)):
      m = re.search(rf"(?i)(?<!\w){re.escape(name)}(?!\w)", tail) if name else None
      if m and (best is None or (m.start(), -len(m.group())) < best[:2]):
        best = (m.start(), -len(m.group()), i)
  return None if best is None else best[2]


def _question(stem: str, choices: Sequence[str], answer_format: str) -> str:
  if answer_format == "text":  # a plain list: no letters to answer with instead
    options = "\n".join(f"- {text}" for text in choices)
    return f"{stem.strip()}\n\n{options}\n\n{_ASK_TEXT}"
  options = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(choices))
  return f"{stem.strip()}\n\n{options}\n\n{_ASK}"


@dataclasses.dataclass(frozen=True)
class _ChoiceBase(QuestionTask):
  """Prompt and reward shared by the multiple-choice tasks; the format request is in the user
  turn (the question's last line)."""
  # Opens the assistant's reply, prefilled: with "The answer is (" the model continues with
  # the letter (and whatever it adds after it), so no reply lacks a readable choice and a
  # rollout needs a few tokens. "" = a free reply.
  answer_prefix: str = ""
  # "letter": options shown as (A)-(D), the reply names a letter; "text": options shown as a
  # plain list, the reply writes its choice out (a small model that cannot tie a letter to an
  # option can still copy the option it means)
  answer_format: str = "letter"
  # reward of a reply that names none of the options ("Thursday" when it is not listed, a
  # repeated "The answer is"); None = reward_wrong. Below reward_wrong it pushes towards
  # naming an option even where no sample is right; on the default model it taught naming
  # any option at chance (configs/reasoning.py's docstring has the figures), so it is off there.
  reward_no_choice: float | None = None

  def __post_init__(self):
    if self.answer_format not in ANSWER_FORMATS:
      raise TaskError(f"{self.name}: answer_format {self.answer_format!r} is unknown; use one "
                      f"of {ANSWER_FORMATS}.")

  def posed(self, record: Record) -> Record:
    """The record with its question text in this task's answer format."""
    return {**record, "question": _question(record["stem"], record["choices"],
                                            self.answer_format)}

  def messages(self, record: Record) -> list[dict[str, str]]:
    turns = super().messages(record)
    if self.answer_prefix:
      turns.append({"role": "assistant", "content": self.answer_prefix})
    return turns

  def choice(self, record: Record, completion: str) -> str | None:
    """The letter of the option the completion chooses, or None. A completion of the
    prefilled turn is read after its prefix: "B) …" reads as B."""
    text = self.answer_prefix + completion
    if self.answer_format == "text":
      index = extract_option(text, record["choices"])
      return None if index is None else LETTERS[index]
    return extract_choice(text, LETTERS[:len(record["choices"])])

  def correct(self, record: Record, completion: str) -> bool:
    return self.choice(record, completion) == record["answer"]

  def reward(self, record: Record, completion: str) -> float:
    chosen = self.choice(record, completion)
    if chosen is None and self.reward_no_choice is not None:
      return self.reward_no_choice
    return self.reward_correct if chosen == record["answer"] else self.reward_wrong

  def reference(self, record: Record) -> str:
    """A correct completion in the asked format: 'The answer is (X).' (or the option's text),
    or what follows the prefilled answer_prefix ('X).' after 'The answer is (')."""
    right = record["choices"][LETTERS.index(record["answer"])]
    said = right.rstrip(".") if self.answer_format == "text" else f"({record['answer']})"
    full = f"The answer is {said}."
    if full.startswith(self.answer_prefix):
      return full[len(self.answer_prefix):]
    return f"{record['answer']})." if self.answer_format == "letter" else f" {said}."


# --------------------------------------------------------------------------------------- ARC


def _arc_record(rec: Record, where: str) -> Record:
  """One ARC-style record in any of three layouts, with its options relabelled A, B, …"""
  question, choices = rec["question"], rec.get("choices")
  if isinstance(question, dict):  # AI2's own: {"stem", "choices": [{"text", "label"}]}
    question, choices = question.get("stem"), question.get("choices")
    if isinstance(choices, list) and all(isinstance(c, dict) for c in choices):
      choices = {"text": [c.get("text") for c in choices],
                 "label": [c.get("label") for c in choices]}
  if isinstance(choices, dict):  # Hugging Face: {"text": [...], "label": [...]}
    texts, labels = choices.get("text"), choices.get("label")
  elif isinstance(choices, list):  # flat: a list of option texts labelled A, B, …
    texts, labels = choices, list(LETTERS[:len(choices)])
  else:
    raise TaskError(f"{where}: `choices` must be {{'text': [...], 'label': [...]}} or a list of "
                    "option texts.")
  if not isinstance(question, str) or not question.strip():
    raise TaskError(f"{where}: the question has no text.")
  if (not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels)
      or not 2 <= len(texts) <= len(LETTERS) or not all(isinstance(t, str) for t in texts)):
    raise TaskError(f"{where}: `choices` needs 2 or more option texts, each with one label.")
  labels = [str(label).strip() for label in labels]
  key = str(rec["answerKey"]).strip()
  if key not in labels:
    raise TaskError(f"{where}: answerKey {key!r} is not one of the labels {labels}.")
  answer = LETTERS[labels.index(key)]
  return {"id": str(rec.get("id", question)), "stem": question, "choices": texts,
          "answer": answer}


@dataclasses.dataclass(frozen=True)
class ARC(_ChoiceBase):
  """ARC-format multiple-choice JSONL files, one per split: `question`, `choices` ({"text",
  "label"} lists, or a flat list of texts labelled A, B, …), `answerKey`; AI2's layout
  (`question` = {"stem", "choices"}) works too. Numeric labels ("1".."4") are shown as A-D.
  `val` may be carved out of train (val_pct, by a hash of the id) when no val file is given."""
  name: str = "arc"
  train_path: str = ""
  test_path: str = ""
  val_path: str = ""
  val_pct: int = 10

  def _load(self, path: str, what: str) -> list[Record]:
    if not path:
      raise TaskError(f"arc needs a {what} file: set the task's {what}_path.")
    return [_arc_record(rec, f"{path}: record {i + 1}")
            for i, rec in enumerate(read_jsonl(path, ("question", "answerKey")))]

  def records(self, split: str) -> Sequence[Record]:
    return [self.posed(r) for r in file_split(self, split, lambda r: r["id"])]


# ----------------------------------------------------------------------- procedural questions
# A generator returns (stem, options, index of the right option); the options are shuffled
# afterwards, so the key is uniform over A-D whatever the generator does.

_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea",
          "Max", "Nia", "Omar", "Pia", "Raj", "Sol", "Tess", "Uma", "Vic", "Wes", "Yara", "Zoe")
# relation → (comparative, opposite comparative, superlative, opposite superlative)
_RELATIONS = {
    "height": ("taller", "shorter", "tallest", "shortest"),
    "age": ("older", "younger", "oldest", "youngest"),
    "speed": ("faster", "slower", "fastest", "slowest"),
    "weight": ("heavier", "lighter", "heaviest", "lightest"),
    "wealth": ("richer", "poorer", "richest", "poorest"),
}


def _ordering(rng: random.Random) -> tuple[str, list[str], int]:
  more, less, most, least = _RELATIONS[rng.choice(sorted(_RELATIONS))]
  people = rng.sample(_NAMES, 4)  # people[0] has the most of the quantity
  facts = []
  for a, b in zip(people, people[1:]):
    facts.append(f"{a} is {more} than {b}." if rng.random() < 0.5 else f"{b} is {less} than {a}.")
  rng.shuffle(facts)
  rank, word = rng.choice([(0, most), (1, f"second {most}"), (3, least), (2, f"second {least}")])
  return f"{' '.join(facts)} Who is the {word}?", people, rank


def _by_stem(stem: str) -> random.Random:
  """A generator seeded by the question: its distractors are a function of the question, so a
  question has one set of options and its split (a hash of question and options) is the
  question's own."""
  return random.Random(hashlib.sha256(stem.encode()).hexdigest())


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _weekday(rng: random.Random) -> tuple[str, list[str], int]:
  today, n, future = rng.randrange(7), rng.randint(2, 60), rng.random() < 0.6
  answer = (today + n) % 7 if future else (today - n) % 7
  when = f"in {n} days" if future else f"{n} days ago"
  verb = "will it be" if future else "was it"
  stem = f"Today is {DAYS[today]}. What day of the week {verb} {when}?"
  # Three other days, at random: near misses that always sat around the answer (one day off
  # either way, two days off) made it the second of four consecutive days, a cue without
  # any counting.
  others = _by_stem(stem).sample([d for d in range(7) if d != answer], 3)
  return stem, [DAYS[answer]] + [DAYS[d] for d in others], 0


_SYLLABLES = ("bl", "gr", "fl", "dr", "sn", "tr", "pl", "cr", "zy", "m", "v", "k")
_VOWELS = ("a", "o", "i", "u", "ee", "oo")


def _nonce(rng: random.Random) -> str:
  # one syllable ('bloox', 'gruz'): two made the longest prompts ~20 tokens longer; endings
  # that make no English plural ('grips', 'creeks' are words)
  return rng.choice(_SYLLABLES) + rng.choice(_VOWELS) + rng.choice(("x", "z", "sk"))


# form → (premises, the conclusion that follows, three that do not)
_SYLLOGISMS = {
    "barbara": ("All {a} are {b}. All {b} are {c}.", "All {a} are {c}.",
                ("All {c} are {a}.", "No {a} are {c}.", "All {b} are {a}.")),
    "celarent": ("All {a} are {b}. No {b} are {c}.", "No {a} are {c}.",
                 ("All {a} are {c}.", "Some {a} are {c}.", "All {c} are {a}.")),
    "darii": ("Some {a} are {b}. All {b} are {c}.", "Some {a} are {c}.",
              ("All {a} are {c}.", "No {a} are {c}.", "All {c} are {b}.")),
    "camestres": ("No {a} are {b}. All {c} are {b}.", "No {c} are {a}.",
                  ("All {a} are {c}.", "Some {c} are {a}.", "All {b} are {c}.")),
}


def _syllogism(rng: random.Random) -> tuple[str, list[str], int]:
  premises, right, wrong = _SYLLOGISMS[rng.choice(sorted(_SYLLOGISMS))]
  nonces: set[str] = set()
  while len(nonces) < 3:
    nonces.add(_nonce(rng))
  words = dict(zip("abc", rng.sample(sorted(nonces), 3)))
  stem = f"{premises.format(**words)} Which statement must be true?"
  return stem, [s.format(**words) for s in (right,) + wrong], 0


# (larger unit, smaller unit, how many smaller units make one larger)
_UNITS = (("metres", "centimetres", 100), ("kilometres", "metres", 1000),
          ("hours", "minutes", 60), ("minutes", "seconds", 60), ("kilograms", "grams", 1000),
          ("days", "hours", 24), ("weeks", "days", 7), ("litres", "millilitres", 1000),
          ("centimetres", "millimetres", 10), ("years", "months", 12))


_FACTORS = sorted({f for _, _, f in _UNITS})


def _conversion(rng: random.Random) -> tuple[str, list[str], int]:
  big, small, f = rng.choice(_UNITS)
  n = rng.randint(2, 25)
  # The slip is the wrong factor (60 for 100, 1000 for 24 …): every option is the given number
  # multiplied (or divided) by some factor, so only knowing the units picks the right one.
  # (Slips around the answer — ×10, ±1 — made it the centre of the options.)
  if rng.random() < 0.5:
    stem, unit, answer = f"How many {small} are there in {n} {big}?", small, n * f
    wrong = [n * g for g in _FACTORS]
  else:
    stem, unit, answer = f"How many {big} are there in {n * f} {small}?", big, n
    # other factors, no conversion, multiplying instead of dividing, subtracting
    wrong = [n * f // g for g in _FACTORS if n * f % g == 0] + [n * f, n * f * f, n * f - f]
  wrong = [w for w in dict.fromkeys(wrong) if w != answer]
  return stem, [f"{v} {unit}" for v in [answer] + _by_stem(stem).sample(wrong, 3)], 0


_CATEGORIES = {
    # no fruit that is also a colour name (peach, apricot, plum, orange, lemon …)
    "fruit": ("apple", "banana", "mango", "pear", "grape", "kiwi", "papaya", "melon", "fig",
              "pineapple", "strawberry", "coconut"),
    "animal": ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "goat", "bear",
               "wolf", "zebra"),
    "colour": ("red", "blue", "green", "yellow", "purple", "brown", "black", "white", "grey"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "tram", "motorcycle", "van",
                "scooter", "taxi"),
    "musical instrument": ("violin", "piano", "guitar", "flute", "trumpet", "drum", "cello",
                           "harp", "clarinet", "trombone"),
    "tool": ("hammer", "saw", "wrench", "screwdriver", "pliers", "drill", "chisel", "shovel"),
    "piece of furniture": ("chair", "table", "sofa", "bed", "desk", "wardrobe", "stool",
                           "bench"),
}
_PROPERTIES = {
    "even": lambda n: n % 2 == 0,
    "a multiple of 3": lambda n: n % 3 == 0,
    "a multiple of 5": lambda n: n % 5 == 0,
    "a prime number": lambda n: n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)),
    "a perfect square": lambda n: int(n ** 0.5) ** 2 == n,
}


def _odd_one_out(rng: random.Random) -> tuple[str, list[str], int]:
  if rng.random() < 0.6:
    cat, other = rng.sample(sorted(_CATEGORIES), 2)
    article = "an" if cat[0] in "aeiou" else "a"
    if rng.random() < 0.5:  # three of a kind and one outsider
      options = [rng.choice(_CATEGORIES[other])] + rng.sample(_CATEGORIES[cat], 3)
      return f"Which of these is not {article} {cat}?", options, 0
    outsiders = [rng.choice(_CATEGORIES[c]) for c in rng.sample(
        [c for c in sorted(_CATEGORIES) if c != cat], 3)]
    return f"Which of these is {article} {cat}?", [rng.choice(_CATEGORIES[cat])] + outsiders, 0
  prop = rng.choice(sorted(_PROPERTIES))
  has = _PROPERTIES[prop]
  yes = [n for n in range(2, 100) if has(n)]
  no = [n for n in range(2, 100) if not has(n)]
  if rng.random() < 0.5:
    options = [rng.choice(no)] + rng.sample(yes, 3)
    return f"Which of these numbers is not {prop}?", [str(n) for n in options], 0
  options = [rng.choice(yes)] + rng.sample(no, 3)
  return f"Which of these numbers is {prop}?", [str(n) for n in options], 0


def _comparison(rng: random.Random) -> tuple[str, list[str], int]:
  """One comparison, read forwards or backwards: 'Ana is taller than Ben. Who is shorter?'
  The other two options are people the question does not mention."""
  more, less, _, _ = _RELATIONS[rng.choice(sorted(_RELATIONS))]
  a, b, *others = rng.sample(_NAMES, 4)
  asked_more = rng.random() < 0.5
  return (f"{a} is {more} than {b}. Who is {more if asked_more else less}?",
          [a if asked_more else b, b if asked_more else a] + others, 0)


def _extremes(rng: random.Random) -> tuple[str, list[str], int]:
  numbers = rng.sample(range(10, 100), 4)
  largest = rng.random() < 0.5
  pick = max(numbers) if largest else min(numbers)
  rest = [n for n in numbers if n != pick]
  return (f"Which number is the {'largest' if largest else 'smallest'}?",
          [str(n) for n in [pick] + rest], 0)


_OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
              ("up", "down"), ("light", "dark"), ("open", "closed"), ("old", "young"),
              ("rich", "poor"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
              ("wet", "dry"), ("high", "low"), ("strong", "weak"), ("loud", "quiet"),
              ("thick", "thin"), ("long", "short"), ("clean", "dirty"), ("safe", "dangerous"),
              ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("day", "night"),
              ("inside", "outside"), ("true", "false"), ("begin", "end"), ("love", "hate"))


def _opposite(rng: random.Random) -> tuple[str, list[str], int]:
  pair = rng.choice(_OPPOSITES)
  word, right = pair if rng.random() < 0.5 else pair[::-1]
  # distractors from other pairs, so none of them is also an opposite of the word
  pool = sorted({w for p in _OPPOSITES if p != pair for w in p})
  return f"What is the opposite of '{word}'?", [right] + rng.sample(pool, 3), 0


GENERATORS: dict[str, Callable[[random.Random], tuple[str, list[str], int]]] = {
    "ordering": _ordering, "weekday": _weekday, "syllogism": _syllogism,
    "conversion": _conversion, "odd_one_out": _odd_one_out, "comparison": _comparison,
    "extremes": _extremes, "opposite": _opposite, **reasoning_facts.GENERATORS,
}


def _draw(kinds: Sequence[str], rng: random.Random) -> tuple[tuple, Callable[[], Record]]:
  kind = rng.choice(kinds)
  stem, options, right = GENERATORS[kind](rng)
  assert len(set(options)) == 4, (kind, stem, options)
  pos = rng.randrange(4)  # where the right option goes: uniform over A-D
  others = [o for i, o in enumerate(options) if i != right]
  rng.shuffle(others)
  choices = others[:pos] + [options[right]] + others[pos:]
  # The identity of a problem is its text up to the order of its options.
  key = (stem, tuple(sorted(options)))
  uid = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
  return key, lambda: {"id": f"{kind}/{uid}", "kind": kind, "stem": stem,
                       "choices": choices, "answer": LETTERS[pos]}


# Share of the problem space in val and in test, by a hash of each problem's identity.
_VAL_PCT, _TEST_PCT = 15, 15


@functools.lru_cache(maxsize=8)
def _procedural(seed: int, kinds: tuple[str, ...], sizes: tuple[int, int, int]) -> dict:
  return draw_splits(functools.partial(_draw, kinds), seed, dict(zip(SPLITS, sizes)),
                     "reasoning", _VAL_PCT, _TEST_PCT)


@dataclasses.dataclass(frozen=True)
class ProceduralReasoning(_ChoiceBase):
  """Generated four-option questions (GENERATORS: orderings from comparisons, day-of-week
  arithmetic, syllogisms over nonsense words, unit conversions, odd one out by category or
  number property). The right option is at a uniform random letter. A problem's identity is
  its question text and its set of options; its split is a hash of that identity, so
  train/val/test never share a problem, whatever the seed."""
  name: str = "reasoning"
  kinds: str = ""  # comma-separated GENERATORS names; "" = all
  seed: int = 0
  train_size: int = 2000
  val_size: int = 200
  test_size: int = 200

  def _kinds(self) -> tuple[str, ...]:
    kinds = tuple(sorted(k.strip() for k in self.kinds.split(",") if k.strip())) or tuple(
        sorted(GENERATORS))
    unknown = sorted(set(kinds) - set(GENERATORS))
    if unknown:
      raise TaskError(f"reasoning kinds {unknown} are unknown; use some of {sorted(GENERATORS)}.")
    return kinds

  def __post_init__(self):
    super().__post_init__()
    self._kinds()

  def records(self, split: str) -> Sequence[Record]:
    check_split(split)
    sizes = (self.train_size, self.val_size, self.test_size)
    recs = _procedural(self.seed, self._kinds(), sizes)[split]
    if not recs:
      raise TaskError(f"reasoning: the {split} split is empty; set {split}_size.")
    return [self.posed(r) for r in recs]
