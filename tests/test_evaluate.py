"""evaluate.score: accuracy and mean reward of greedy replies, each record counted once (the
last batch padded), against every record's reply generated on its own."""

from __future__ import annotations

import t2jax
from modulo_task import Modulo
from t2jax import evaluate
from t2jax.tokenizer import encode_chats


def test_score_counts_each_record_once(random_chat_model):
  model, task = random_chat_model, Modulo()
  records = task.records("test") + task.records("val")[:1]  # batches of 2, 2 and 1 (+ 1 pad)
  prompts = encode_chats(model.tokenizer, [task.messages(r) for r in records])
  got = evaluate.score(model.params, prompts, records, task=task, model=model,
                       max_new_tokens=4, batch_size=2)
  texts = [t2jax.generate(model, [p], max_new_tokens=4).texts[0] for p in prompts]
  right = [task.correct(r, t) for r, t in zip(records, texts)]
  assert 0 < sum(right) < len(right)  # rows differ: a row dropped or counted twice shows
  assert got == {"accuracy": sum(right) / 5,
                 "reward": sum(task.reward(r, t) for r, t in zip(records, texts)) / 5,
                 "count": 5}
