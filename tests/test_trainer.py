"""trainer.collect: row b·G + g of the rollouts is sample g of prompt b, scored against that
prompt's record."""

from __future__ import annotations

import dataclasses

import numpy as np

import t2jax
from modulo_task import Modulo
from t2jax import sampling, trainer
from t2jax.tokenizer import encode_chats


@dataclasses.dataclass(frozen=True)
class Tagged(Modulo):
  """Modulo whose reward names the record and the reply's length: a reward given for another
  record's prompt, or for another prompt's reply, shows."""

  def reward(self, record, completion):
    return 10.0 * record["i"] + len(completion)


def test_collect_scores_each_sample_against_its_own_record(random_chat_model):
  """Greedy, so each prompt's 2 samples are its reply generated alone."""
  model, task = random_chat_model, Tagged()
  records = [{"i": 0, "question": "test question 0: say something."},  # questions whose
             {"i": 1, "question": "What is 3 + 4?"},  # greedy replies differ
             {"i": 2, "question": "Sort a list."}]
  prompts = encode_chats(model.tokenizer, [task.messages(r) for r in records])
  got = trainer.collect(model.params, prompts, records, task=task, tokenizer=model.tokenizer,
                        cfg=model.config, sampler=sampling.Sampler(temperature=0.0),
                        samples=2, max_new=4, seed=0, pad_id=model.pad_id,
                        eos_ids=model.eos_ids)
  alone = [t2jax.generate(model, [p], max_new_tokens=4).texts[0] for p in prompts]
  assert len(set(alone)) == 3  # the prompts' replies differ: a row under another prompt shows
  assert got.texts == [t for t in alone for _ in range(2)]
  np.testing.assert_array_equal(got.rollouts.reward_N,
                                [10.0 * i + len(t) for i, t in enumerate(alone) for _ in "gg"])
  np.testing.assert_array_equal(got.correct, [task.correct(r, t) for r, t in zip(records, alone)
                                              for _ in "gg"])
  np.testing.assert_array_equal(got.rollouts.prompt_BxP, sampling.left_pad(prompts,
                                                                           model.pad_id)[0])
  assert got.new_tokens == int(got.rollouts.completion_mask_NxC.sum())
