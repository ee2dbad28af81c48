"""Procedural code problems as templates: each factory draws the semantic parameters of one
function-writing problem (what to compute, a reference body, how to draw a test's arguments);
tasks/code.py names the function, draws its tests and writes the prompt."""

from __future__ import annotations

import dataclasses
import random
import string
from typing import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Spec:
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
  return Spec(("sum_filtered", op, k), "xs",
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
  return Spec(("count_chars", chars, fold), "s",
               f"returns how many characters of the string `s` are one of {chars!r}{case}",
               f"    return sum(1 for c in {s} if c in {chars!r})\n",
               lambda r: (_word(r, pool, 0, 12),))


def _affine_map(rng):
  a, b = rng.choice([-3, -2, -1, 2, 3, 4, 5, 10]), rng.randint(-10, 10)
  return Spec(("affine_map", a, b), "xs",
               f"returns a new list in which every number x of the list `xs` becomes "
               f"{a} * x + {b}",
               f"    return [{a} * x + {b} for x in xs]\n",
               lambda r: (_ints(r, -9, 9, 0, 6),))


def _polynomial(rng):
  a, b, c = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9)
  return Spec(("polynomial", a, b, c), "x",
               f"returns {a} * x**2 + {b} * x + {c} for the integer `x`",
               f"    return {a} * x * x + {b} * x + {c}\n",
               lambda r: (r.randint(-20, 20),))


def _count_multiples(rng):
  k, negate = rng.randint(2, 12), rng.random() < 0.3
  rem = 0 if rng.random() < 0.5 else rng.randrange(k)
  nt, cond = ("not ", "!=") if negate else ("", "==")
  what = f"divisible by {k}" if rem == 0 else f"leaving the remainder {rem} when divided by {k}"
  return Spec(("count_multiples", k, rem, negate), "xs",
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
  return Spec(("palindrome", variant, m), "s",
               f"returns True if the string `s` {longer}reads the same backwards, {variant}, "
               "and False otherwise", body, lambda r: _palindrome_arg(r, variant))


_CASES = {"": "c", ", in upper case": "c.upper()", ", with its case swapped": "c.swapcase()"}


def _repeat_chars(rng):
  n, case, sep = rng.randint(2, 5), rng.choice(sorted(_CASES)), rng.choice(["", "-", " "])
  between = f", and the groups joined by {sep!r}" if sep else ""
  return Spec(("repeat_chars", n, case, sep), "s",
               f"returns the string `s` with every character repeated {n} times{case}{between}",
               f"    return {sep!r}.join({_CASES[case]} * {n} for c in s)\n",
               lambda r: (_word(r, string.ascii_letters, 0, 6),))


def _clip(rng):
  lo = rng.randint(-10, 15)
  hi = lo + rng.randint(1, 15)
  return Spec(("clip", lo, hi), "xs",
               f"returns a new list where the numbers of the list `xs` below {lo} become {lo} "
               f"and those above {hi} become {hi}",
               f"    return [min(max(x, {lo}), {hi}) for x in xs]\n",
               lambda r: (_ints(r, lo - 10, hi + 10),))


def _long_words(rng):
  op, count = rng.choice(sorted(_CMP) + ["=="]), rng.random() < 0.4
  k = rng.randint(2 if op == "<" else 1, 6)  # no word has fewer than 1 letter
  words = "exactly" if op == "==" else _CMP[op]
  what, ret = ("how many words", "len(out)") if count else ("the list of the words", "out")
  return Spec(("long_words", k, op, count), "s",
               f"returns {what} of the string `s` (separated by single spaces) that have {words} "
               f"{k} letters" + ("" if count else ", in their order"),
               f"    out = [w for w in s.split(' ') if len(w) {op} {k}]\n    return {ret}\n",
               lambda r: (_sentence(r, 1, 7),))


def _starting_with(rng):
  c, end, fold = rng.choice(string.ascii_lowercase), rng.random() < 0.4, rng.random() < 0.5
  letters = string.ascii_lowercase[:6] + c * 5 + c.upper() * 2
  where = "endswith" if end else "startswith"
  case, w = (", ignoring case", "w.lower()") if fold else ("", "w")
  return Spec(("starting_with", c, end, fold), "s",
               f"returns how many words of the string `s` (separated by spaces) "
               f"{'end' if end else 'start'} with the letter {c!r}{case}",
               f"    return sum(1 for w in s.split() if {w}.{where}({c!r}))\n",
               lambda r: (" ".join(_word(r, letters, 1, 5) for _ in range(r.randint(1, 7))),))


_BUZZ = ("Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom", "Ping", "Pong")


def _fizzbuzz(rng):
  a, b = rng.sample(range(2, 10), 2)
  wa, wb = rng.sample(_BUZZ, 2)
  return Spec(("fizzbuzz", a, b, wa, wb), "n",
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
    return Spec(("reverse_letters", sep, split), "s",
                 f"returns {given} with the letters of each word reversed, in their order, "
                 f"joined by {sep!r}",
                 f"    return {sep!r}.join(w[::-1] for w in s.split({split!r}))\n", args)
  return Spec(("reverse_words", sep, split), "s",
               f"returns {given} in reverse order, joined by {sep!r}",
               f"    return {sep!r}.join(reversed(s.split({split!r})))\n", args)


def _caesar(rng):
  k, forward, upper = rng.randint(1, 25), rng.random() < 0.5, rng.random() < 0.3
  way = "forward (from z around to a)" if forward else "backward (from a around to z)"
  shift, (lo, a) = (k if forward else 26 - k), (("A", 65) if upper else ("a", 97))
  case = "uppercase" if upper else "lowercase"
  return Spec(("caesar", k, forward, upper), "s",
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
    return Spec(("running_offset", c), "xs",
                 f"returns a list whose element i is {c} plus the sum of xs[0] to xs[i], for "
                 "the list `xs`",
                 f"    return [{c} + sum(xs[:i + 1]) for i in range(len(xs))]\n",
                 lambda r: (_ints(r, -5, 9, 1, 7),))
  if op == "window":
    w = rng.randint(2, 5)
    return Spec(("running_window", w), "xs",
                 f"returns a list whose element i is the sum of the last {w} elements of the "
                 f"list `xs` up to and including xs[i] (fewer at the start)",
                 f"    return [sum(xs[max(0, i - {w - 1}):i + 1]) for i in range(len(xs))]\n",
                 lambda r: (_ints(r, -5, 9, 1, 8),))
  return Spec(("running", op), "xs",
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
  return Spec(("dedupe", variant), "xs",
               f"returns the elements of the list `xs` {_DEDUPE[variant][0]}",
               _DEDUPE[variant][1], args)


_PAIR_METRIC = {"sum": "p[0] + p[1]", "product": "p[0] * p[1]", "first number": "p[0]",
                "second number": "p[1]", "difference a - b": "p[0] - p[1]"}


def _best_pair(rng):
  metric, best = rng.choice(sorted(_PAIR_METRIC)), rng.choice(["largest", "smallest"])
  fn = "max" if best == "largest" else "min"
  return Spec(("best_pair", metric, best), "pairs",
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
  return Spec(("gcd",) + which, sig, f"returns {what}", body, args)


def _digits(rng):
  p = rng.randint(-3, 4)
  if p < 0:
    b = rng.randint(2, 9)
    return Spec(("digit_sum_base", b), "n",
                 f"returns the sum of the digits of the non-negative integer `n` written in "
                 f"base {b}",
                 f"    total = 0\n    while n:\n        total += n % {b}\n        n //= {b}\n"
                 "    return total\n",
                 lambda r: (r.randint(0, 500),))
  if p == 0:
    return Spec(("digit_product",), "n",
                 "returns the product of the nonzero digits of the non-negative integer `n` "
                 "(1 if there are none)",
                 "    out = 1\n    for d in str(n):\n        if d != '0':\n"
                 "            out *= int(d)\n    return out\n",
                 lambda r: (r.randint(0, 10 ** r.randint(1, 5)),))
  power = "" if p == 1 else f", each raised to the power {p}"
  return Spec(("digit_sum", p), "n",
               f"returns the sum of the digits of the non-negative integer `n`{power}",
               f"    return sum(int(d) ** {p} for d in str(n))\n",
               lambda r: (r.randint(0, 10 ** r.randint(1, 5)),))


def _to_base(rng):
  b = rng.randint(2, 9)
  return Spec(("to_base", b), "n",
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
  return Spec(("rotate", k, left), "xs",
               f"returns the list `xs` rotated {way} by {k} positions, wrapping around (an "
               "empty list stays empty)",
               f"    if not xs:\n        return []\n    k = {cut}\n    return xs[k:] + xs[:k]\n",
               lambda r: (_ints(r, 0, 9, 0, 7),))


def _second(rng):
  largest, k = rng.random() < 0.5, rng.randint(2, 4)
  which, rev = ("largest", "True") if largest else ("smallest", "False")
  nth = {2: "second", 3: "third", 4: "fourth"}[k]
  return Spec(("second", largest, k), "xs",
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
  return Spec(("run_length", count_first), "s",
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

  return Spec(("balanced", pairs), "s",
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
  return Spec(("longest_run", kind), "xs",
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
  return Spec(("most_frequent", smallest, most), "xs",
               f"returns the {'most' if most else 'least'} frequent element of the non-empty "
               f"list `xs`; on a tie, {tie}",
               f"    return min(xs, key=lambda x: {key})\n",
               lambda r: (_ints(r, 0, 6, 1, 8),))


def _chunk_sums(rng):
  k, (what, fn) = rng.randint(2, 6), rng.choice([("sums", "sum"), ("maxima", "max"),
                                                 ("minima", "min")])
  return Spec(("chunk_sums", k, fn), "xs",
               f"returns the list of the {what} of consecutive chunks of {k} elements of the "
               "list `xs` (the last chunk may be shorter)",
               f"    return [{fn}(xs[i:i + {k}]) for i in range(0, len(xs), {k})]\n",
               lambda r: (_ints(r, -5, 9, 0, 11),))


def _primes(rng):
  count = rng.random() < 0.5
  what = "how many prime numbers p satisfy" if count else "the list of prime numbers p with"
  ret = "len(out)" if count else "out"
  return Spec(("primes", count), "lo, hi",
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

  return Spec(("matrix", what), "m",
               f"returns {what} the matrix `m`, a non-empty list of rows of equal length",
               _MATRIX[what], args)


def _word_counts(rng):
  fold = rng.random() < 0.5
  case, w = (" lowercased", "w.lower()") if fold else ("", "w")
  return Spec(("word_counts", fold), "s",
               f"returns a dict that maps every word of the string `s` (separated by spaces){case}"
               " to the number of times it occurs",
               "    out = {}\n    for w in s.split():\n"
               f"        out[{w}] = out.get({w}, 0) + 1\n    return out\n",
               lambda r: (" ".join(r.choice(["a", "b", "the", "The", "cat", "Cat"])
                                   for _ in range(r.randint(0, 7))),))


# template → (level, function names, problem factory)
TEMPLATES: Mapping[str, tuple[int, tuple[str, ...], Callable[[random.Random], Spec]]] = {
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
