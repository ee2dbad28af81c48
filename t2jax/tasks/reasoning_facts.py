"""Knowledge question families for tasks/reasoning.py: everyday facts a small instruction model
half knows (what a tool is for, which animal makes a sound, what its young are called, what
colour a thing is), posed as four-option questions. They stand in for ARC-Easy's grade-school
knowledge: SmolLM2-135M, asked greedily, mostly failed to name any option here (70-87 % of
replies), while a majority vote over its sampled choices was right more often than chance on
some — room for an expert to learn to answer."""

from __future__ import annotations

import random

# purpose → the tool for it; no purpose names its tool, no tool serves another purpose here
USES = (("cut paper", "scissors"), ("write a letter", "pen"), ("drink water from", "cup"),
        ("sweep the floor", "broom"), ("dig a hole", "shovel"), ("unlock a door", "key"),
        ("clean your teeth", "toothbrush"), ("eat soup", "spoon"), ("tell the time", "clock"),
        ("take a photo", "camera"), ("boil water", "kettle"), ("dry your body", "towel"),
        ("call a friend", "phone"), ("drive a nail into wood", "hammer"),
        ("stay dry in the rain", "umbrella"), ("reach a high shelf", "ladder"),
        ("sew on a button", "needle"), ("keep food cold", "fridge"),
        ("find your way in a new city", "map"), ("measure a fever", "thermometer"),
        ("draw a straight line", "ruler"), ("see things far away", "telescope"))

# animal → the sound it makes
SOUNDS = (("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
          ("pig", "oink"), ("lion", "roar"), ("horse", "neigh"), ("owl", "hoot"),
          ("snake", "hiss"), ("bee", "buzz"), ("frog", "croak"), ("rooster", "cock-a-doodle-doo"))

# animal → what its young are called
YOUNG = (("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("horse", "foal"),
         ("sheep", "lamb"), ("duck", "duckling"), ("frog", "tadpole"), ("bear", "cub"),
         ("pig", "piglet"), ("hen", "chick"), ("butterfly", "caterpillar"),
         ("kangaroo", "joey"), ("goose", "gosling"), ("goat", "kid"))

# thing → its colour (things of one clear colour); the wrong options are other colours
COLOURS = (("a banana", "yellow"), ("grass", "green"), ("a clear sky", "blue"),
           ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"),
           ("a carrot", "orange"), ("chocolate", "brown"), ("a lemon", "yellow"),
           ("milk", "white"), ("blood", "red"), ("a cucumber", "green"), ("a crow", "black"),
           ("a pumpkin", "orange"), ("a strawberry", "red"), ("coffee", "brown"),
           ("a lime", "green"), ("salt", "white"))


def _pick(rng: random.Random, table, asked: int) -> tuple[tuple[str, str], list[str]]:
  """A row of `table` and three wrong answers: other rows' entry in column `asked`, none
  equal to the row's own."""
  row = rng.choice(table)
  others = sorted({r[asked] for r in table} - {row[asked]})
  return row, rng.sample(others, 3)


def uses(rng: random.Random) -> tuple[str, list[str], int]:
  (purpose, tool), wrong = _pick(rng, USES, 1)
  return f"What do you use to {purpose}?", [tool] + wrong, 0


def _either_way(rng: random.Random, table, *asks: tuple[int, str]):
  """One of two questions over `table`, at even odds: (column asked for, question template
  formatted with the row)."""
  column, template = asks[0] if rng.random() < 0.5 else asks[1]
  row, wrong = _pick(rng, table, column)
  return template.format(*row), [row[column]] + wrong, 0


def sounds(rng: random.Random) -> tuple[str, list[str], int]:
  return _either_way(rng, SOUNDS, (0, "Which animal says '{1}'?"),
                     (1, "What sound does a {0} make?"))


def young(rng: random.Random) -> tuple[str, list[str], int]:
  return _either_way(rng, YOUNG, (1, "What is a baby {0} called?"),
                     (0, "Which animal's baby is called a {1}?"))


def colours(rng: random.Random) -> tuple[str, list[str], int]:
  (thing, colour), wrong = _pick(rng, COLOURS, 1)
  return f"What colour is {thing}?", [colour] + wrong, 0


GENERATORS = {"uses": uses, "sounds": sounds, "young": young, "colours": colours}
