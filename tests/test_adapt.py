"""Two-pass adaptation (adapt.py) and the classification task (tasks/cls.py), against
independent references: full-sequence logits per [prompt + label], numpy mixtures, and each
row generated alone."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest

import t2jax
from t2jax import adapt
from t2jax import tasks as tasks_lib
from t2jax.svf import SVFError
from t2jax.tasks.base import TaskError, check_split
from t2jax.tasks.cls import Classification, classification_messages, extract_label
from t2jax.tasks.math import Arithmetic
from t2jax.tokenizer import encode_chats


LABELS = ["math", "code", "reasoning", "other"]  # "reasoning}" is 3 tokens, the others 2
QUESTIONS = ["What is 3 + 4?",
             "Write a Python function that returns the sum of a list of integers, or 0.",
             "All birds fly?"]


pytestmark = pytest.mark.usefixtures("private_cache")


def _reference_probs(model, questions, labels, expert=None, style="ours") -> np.ndarray:
  """p(label) from full, unshared sequences [prompt + label + "}"], right-padded (causal: the
  padding after a sequence cannot change it) and run in one model.logits call."""
  tok = model.tokenizer
  opening = classification_messages("q", labels, style)[-1]["content"]  # the prefilled turn
  prefix = tok(opening, add_special_tokens=False)["input_ids"]
  user_turns = [classification_messages(q, labels, style)[:-1] for q in questions]  # no prefill
  prompts = [tok(tok.apply_chat_template(t, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] + prefix for t in user_turns]
  label_ids = [tok(lab + "}", add_special_tokens=False)["input_ids"] for lab in labels]
  seqs = [(p, lab) for p in prompts for lab in label_ids]
  width = max(len(p) + len(lab) for p, lab in seqs)
  ids = np.array([p + lab + [0] * (width - len(p) - len(lab)) for p, lab in seqs])
  rows = [i for i, (_, lab) in enumerate(seqs) for _ in lab]
  cols = [len(p) - 1 + t for p, lab in seqs for t in range(len(lab))]
  logits = np.asarray(model.logits(ids, expert)[np.array(rows), np.array(cols)], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = logp[np.arange(len(rows)), [t for _, lab in seqs for t in lab]]
  seq = np.bincount(rows, weights=picked).reshape(len(prompts), len(labels))
  e = np.exp(seq - seq.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Pass 1


def test_a_final_assistant_turn_is_prefilled(model):
  tok = model.tokenizer
  user = [{"role": "user", "content": "What is 2+2?"}]
  (plain,) = encode_chats(tok, [user])
  (filled,) = encode_chats(tok, [user + [{"role": "assistant", "content": "The answer is"}]])
  assert filled[:len(plain)] == plain  # the generation prompt, then the prefill, no end of turn
  assert tok.decode(filled[len(plain):]) == "The answer is"


def test_label_probs_equal_full_sequences(model, experts):
  prompts = adapt.classification_prompts(model, QUESTIONS, LABELS)
  prefix, rests = adapt.shared_prefix(model, prompts, LABELS)
  assert len(prefix) > 100 and all(p == prefix + r for p, r in zip(prompts, rests))
  assert len({len(r) for r in rests}) == 3  # left padding of different lengths
  tokens, mask = adapt.label_tokens(model, LABELS)
  assert sorted(set(mask.sum(1))) == [2, 3]  # labels of different token lengths
  want = _reference_probs(model, QUESTIONS, LABELS)
  got = adapt.label_probs(model, QUESTIONS, LABELS)
  assert got.shape == (3, 4) and np.allclose(got.sum(1), 1)
  assert want.max() > 0.5  # far from uniform: the comparison means something
  np.testing.assert_allclose(got, want, atol=1e-4)
  chunked = adapt.label_probs(model, QUESTIONS, LABELS, batch_size=2)  # 2 batches, one padded
  np.testing.assert_allclose(chunked, want, atol=1e-4)
  # the classification expert's path: the same scores under the expert's weights
  e = experts["math"]
  np.testing.assert_allclose(adapt.label_probs(model, QUESTIONS, LABELS, expert=e),
                             _reference_probs(model, QUESTIONS, LABELS, e), atol=1e-4)


def test_official_dispatch_prompt_scores_labels_after_its_own_wording(model):
  labels = ["code", "math", "reasoning", "other"]
  msgs = classification_messages("What is 2+2?", labels, "official")
  assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
  assert msgs[1]["content"] == "What is 2+2?"
  assert "Classification: \\boxed{category}" in msgs[0]["content"]
  want = _reference_probs(model, QUESTIONS, labels, style="official")
  got = adapt.label_probs(model, QUESTIONS, labels, prompt_style="official")
  np.testing.assert_allclose(got, want, atol=1e-4)
  ours = adapt.label_probs(model, QUESTIONS, labels)
  assert np.abs(ours - got).max() > 1e-2  # the wording is not ignored
  with pytest.raises(ValueError, match="official dispatch prompt names the labels"):
    adapt.label_probs(model, QUESTIONS, ["math", "code", "other"], prompt_style="official")
  with pytest.raises(ValueError, match="unknown"):
    classification_messages("q", labels, "mine")


def test_calibrated_probs_divide_by_the_content_free_prior(model):
  raw = _reference_probs(model, QUESTIONS + list(adapt.CONTENT_FREE), LABELS)
  prior = np.exp(np.log(raw[3:]).mean(0))
  want = raw[:3] / prior
  want /= want.sum(1, keepdims=True)
  got = adapt.label_probs(model, QUESTIONS, LABELS, calibrated=True)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got - raw[:3]).max() > 1e-2  # the prior is not uniform: calibration changes p


def test_the_content_free_rows_are_scored_once_per_model_expert_and_labels(model,
                                                                           monkeypatch):
  labels = ["code", "math", "other"]  # a label set no other test uses: nothing remembered yet
  seen = []
  scored = adapt.classification_prompts

  def counting(m, qs, labs, *style):
    if list(qs) != ["A", "7"]:  # shared_prefix's probe questions, built for every batch
      seen.append(len(qs))
    return scored(m, qs, labs, *style)

  monkeypatch.setattr(adapt, "classification_prompts", counting)
  first = adapt.label_probs(model, QUESTIONS, labels, calibrated=True)
  again = adapt.label_probs(model, QUESTIONS[:2], labels, calibrated=True)
  np.testing.assert_allclose(again, first[:2], atol=1e-4)  # other padding: f32 rounding
  assert seen == [len(QUESTIONS) + len(adapt.CONTENT_FREE), 2]


def test_the_shared_prefix_runs_once_per_model_and_expert(model, experts, monkeypatch):
  calls = []
  real = adapt._prefix_cache

  def counting(params, prefix_K, *, cfg):
    calls.append(len(prefix_K))
    return real(params, prefix_K, cfg=cfg)

  monkeypatch.setattr(adapt, "_prefix_cache", counting)
  labels = ["math", "other"]  # a label set no other test uses: nothing remembered yet
  want = _reference_probs(model, QUESTIONS, labels)
  np.testing.assert_allclose(adapt.label_probs(model, QUESTIONS[:2], labels), want[:2], atol=1e-4)
  np.testing.assert_allclose(adapt.label_probs(model, QUESTIONS[2:], labels), want[2:], atol=1e-4)
  assert len(calls) == 1
  adapt.label_probs(model, QUESTIONS, labels, expert=experts["math"])  # other weights: rerun
  assert len(calls) == 2


def test_identity_cls_expert_equals_the_prompt_strategy(model):
  identity = t2jax.Expert.init(model)  # scale z = 1
  np.testing.assert_allclose(adapt.label_probs(model, QUESTIONS, LABELS, expert=identity),
                             adapt.label_probs(model, QUESTIONS, LABELS), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Dispatch


def _toy_experts():
  rng = np.random.default_rng(0)
  make = lambda name: t2jax.Expert(
      z={"a": rng.standard_normal(4).astype(np.float32),
         "b": rng.standard_normal(3).astype(np.float32)},
      fingerprint="f", targets="t", rank=None, name=name)
  return {"math": make("math"), "code": make("code"), "reasoning": make("reasoning")}


def test_dispatch_argmax_other_and_mixture_fallback():
  experts = _toy_experts()
  probs = np.array([[0.1, 0.7, 0.1, 0.1],  # code
                    [0.05, 0.05, 0.1, 0.8],  # other → base model
                    [0.4, 0.3, 0.1, 0.2]])  # max 0.4 < threshold → mixture of all experts
  rows, weights = adapt.dispatch(probs, LABELS, experts, threshold=0.5)
  assert rows[0] is experts["code"] and weights[0] == {"code": 1.0}
  assert rows[1] is None and weights[1] == {}
  w = np.array([0.4, 0.3, 0.1]) / 0.8  # p renormalised over the experts ("other" dropped)
  assert weights[2] == pytest.approx(dict(zip(["math", "code", "reasoning"], w)))
  for k in ("a", "b"):
    want = sum(wi * experts[n].z[k] for wi, n in zip(w, ["math", "code", "reasoning"]))
    np.testing.assert_allclose(rows[2].z[k], want, rtol=1e-6)
  # threshold 0: always the argmax; a max p equal to the threshold is not below it
  rows, _ = adapt.dispatch(probs, LABELS, experts, threshold=0.0)
  assert rows[2] is experts["math"]
  rows, _ = adapt.dispatch(probs[2:], LABELS, experts, threshold=0.4)
  assert rows[0] is experts["math"]
  with pytest.raises(ValueError, match="needs an expert"):
    adapt.dispatch(probs, LABELS, {"math": experts["math"]}, threshold=0.5)


# ---------------------------------------------------------------------------------------------
# Few-shot CEM


@dataclasses.dataclass(frozen=True)
class EchoTask:
  """Solved iff the completion is exactly `target`; splits given as lists."""
  splits: dict
  name: str = "echo"

  def records(self, split):
    check_split(split)
    return self.splits[split]

  def messages(self, record):
    return [{"role": "user", "content": record["question"]}]

  def correct(self, record, completion):
    return completion == record["target"]

  def reward(self, record, completion):
    return 1.0 if self.correct(record, completion) else -1.0


NEW = 2  # tokens generated per shot


@pytest.fixture(scope="module")
def echo(model, experts):
  """Shots whose target is what the `math` expert alone says: α = (1, 0) solves them all."""
  questions = ["Tell me a fact.", "Name a color.", "Count to three.", "Say hello."]
  gen = t2jax.generate(model, questions, max_new_tokens=NEW, experts=experts["math"])
  train = [{"question": q, "target": t} for q, t in zip(questions, gen.texts)]
  test = [{"question": "Held out.", "target": "x"}]
  task = EchoTask(splits={"train": train, "val": train[:2], "test": test})
  prompts = encode_chats(model.tokenizer, [task.messages(r) for r in train])
  return task, prompts, train


def test_simplex_clamps_then_divides_by_the_sum():
  np.testing.assert_allclose(adapt.simplex([0.2, 0.6]), [0.25, 0.75])
  np.testing.assert_allclose(adapt.simplex([1.7, -0.3, 1.0]), [0.5, 0.0, 0.5])  # clamped first
  np.testing.assert_allclose(adapt.simplex([-1.0, 0.0, -2.0]), [1 / 3] * 3)  # all zero: uniform
  per_matrix = adapt.simplex([[0.2, -1.0, 3.0], [0.6, -1.0, 0.0]])  # [K, M]: per column
  np.testing.assert_allclose(per_matrix, [[0.25, 0.5, 1.0], [0.75, 0.5, 0.0]])
  # a population [2, K=3, M=2], experts on axis 1: each (row, matrix) column on its own
  pop = adapt.simplex([[[0.2, -1.0], [0.6, -2.0], [0.2, -3.0]],
                       [[1.5, 0.5], [0.5, 0.5], [-1.0, 0.0]]], axis=1)
  np.testing.assert_allclose(pop, [[[0.2, 1 / 3], [0.6, 1 / 3], [0.2, 1 / 3]],
                                   [[2 / 3, 0.5], [1 / 3, 0.5], [0.0, 0.0]]])


@pytest.mark.parametrize("parametrisation", ["scale", "paper"])
def test_a_mixture_of_identical_experts_is_that_expert(loaded, parametrisation):
  tiny, _ = loaded("llama")
  base = t2jax.Expert.init(tiny, parametrisation=parametrisation)
  rng = np.random.default_rng(5)
  e = dataclasses.replace(base, z={k: (v + 0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                                   for k, v in base.z.items()})
  ids = rng.integers(0, tiny.config.vocab_size, (2, 9))
  want = np.asarray(tiny.logits(ids, e))
  assert np.abs(want - np.asarray(tiny.logits(ids))).max() > 0.1  # e is not the base model
  keys = tuple(sorted(e.z))
  per_expert = [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1 / 3] * 3,
                [0.9, 0.9, 0.9], [0.0, 0.0, 0.0]]  # the last two: off the simplex, projected
  per_matrix = [rng.uniform(0, 1, (3, len(keys))), np.eye(3, len(keys)),
                np.zeros((3, len(keys)))]
  for alpha in per_expert + per_matrix:
    mixed = adapt.mix([e, e, e], alpha, keys if np.ndim(alpha) == 2 else ())
    for k in keys:
      np.testing.assert_allclose(mixed.z[k], e.z[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(tiny.logits(ids, mixed)), want, atol=2e-5)
  # what the simplex prevents: the unnormalised official mix α = (0.9, 0.9, 0.9) is another
  # model, by several logit units (scale: weights × 2.7; paper: sigmoid(2.7 p), rescaled)
  raw = dataclasses.replace(e, z={k: (2.7 * v).astype(np.float32) for k, v in e.z.items()})
  assert np.abs(np.asarray(tiny.logits(ids, raw)) - want).max() > 0.5
  with pytest.raises(SVFError, match="sum to 1"):
    t2jax.Expert.mix([e, e, e], [0.9, 0.9, 0.9])


def test_population_in_one_batch_equals_each_candidate_alone(model, experts, echo, monkeypatch):
  task, prompts, shots = echo
  pair = [experts["math"], experts["code"]]
  alphas = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.8, 0.3], [0.4, 0.4], [3.0, -1.0]])
  rows = []
  real = adapt.generate

  def spy(model_, prompts_, **kwargs):
    rows.append(len(prompts_))
    return real(model_, prompts_, **kwargs)

  monkeypatch.setattr(adapt, "generate", spy)
  scores, per = adapt.evaluate_population(model, pair, alphas, prompts, shots, task,
                                          max_new_tokens=NEW)
  # rows 4 and 5 project onto rows 1 and 0: 4 distinct candidates generated, in one call
  assert rows == [4 * len(shots)]
  np.testing.assert_array_equal(per[4], per[1])
  np.testing.assert_array_equal(per[5], per[0])
  assert per[0].all() and scores[0] == 1.0  # the math expert alone reproduces its targets
  assert scores.min() < 1.0  # candidates differ
  for a, row in zip(alphas, per):
    _, alone = adapt.evaluate_population(model, pair, a[None], prompts, shots, task,
                                         max_new_tokens=NEW)
    np.testing.assert_array_equal(alone[0], row)


@dataclasses.dataclass(frozen=True)
class RefTask(EchoTask):
  """Never solved (every candidate ties at 0), with the echo target as reference answer: the
  search can only follow the log-likelihood tie rule."""

  def correct(self, record, completion):
    return False

  def reference(self, record):
    return record.get("target") or None


def test_reference_loglik_equals_each_sequence_alone(model, experts, echo):
  task, prompts, shots = echo
  pair = [experts["math"], experts["code"]]
  ref_task = RefTask(splits=task.splits)
  records = [*shots[:3], {"question": "No reference.", "target": ""}]
  refs = adapt.reference_tokens(model, ref_task, records)
  assert refs[3] is None and all(refs[:3])
  ps = prompts[:3] + encode_chats(model.tokenizer, [ref_task.messages(records[3])])
  alphas = np.array([[1.0, 0.0], [0.3, 0.7], [1.0, 0.0]])
  got = adapt.reference_loglik(model, pair, alphas, ps, refs)
  assert got.shape == (3, 4) and np.isnan(got[:, 3]).all()
  chunked = adapt.reference_loglik(model, pair, alphas, ps, refs, batch_size=4)  # 4 + 2 rows
  np.testing.assert_allclose(chunked, got, atol=1e-4)
  np.testing.assert_array_equal(got[2], got[0])  # equal α: scored once, copied
  for a, row in zip(alphas[:2], got):
    mixed = adapt.mix(pair, a)
    for p, r, value in zip(ps, refs[:3], row):
      seq = np.array([p + r])
      logp = np.asarray(model.logits(seq, mixed), np.float64)[0]
      logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1,
                                                                         keepdims=True)) \
          - logp.max(-1, keepdims=True)
      want = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(r))
      assert value == pytest.approx(want, abs=2e-3)


def test_ranking_breaks_ties_by_loglik():
  order = adapt.rank([0.5, 0.75, 0.75, 0.25], [-1.0, -9.0, -3.0, 0.0])
  np.testing.assert_array_equal(order, [2, 1, 0, 3])
  np.testing.assert_array_equal(adapt.rank([1.0, 1.0, 0.0], [np.nan] * 3), [0, 1, 2])
  np.testing.assert_array_equal(adapt.rank([1.0, 1.0, 1.0], [np.nan] * 3, tie_P=[1, 2, 0]),
                                [2, 0, 1])


def test_few_shot_cem_searches_the_simplex_and_improves_the_objective(model, experts, echo,
                                                                      monkeypatch, tmp_path):
  task, prompts, shots = echo
  seen = []
  real = adapt.evaluate_population

  def spy(model_, experts_, alphas, *args, **kwargs):
    seen.append(np.array(alphas))
    return real(model_, experts_, alphas, *args, **kwargs)

  monkeypatch.setattr(adapt, "evaluate_population", spy)
  pair = [experts["math"], experts["code"]]
  result = adapt.few_shot_cem(model, pair, prompts, shots, task, max_new_tokens=NEW,
                              population=12, elites=3, iterations=4, init_std=1.0, seed=1)
  assert len(seen) == 4 and all(p.shape == (12, 2) for p in seen)  # one batch per iteration
  np.testing.assert_array_equal(np.stack(seen), result.candidates)
  pops = np.concatenate(seen)
  np.testing.assert_allclose(pops.sum(axis=1), 1.0, atol=1e-12)  # every candidate on the simplex
  assert pops.min() == 0.0 and pops.max() == 1.0  # std 1 draws outside [0, 1]: clamped
  np.testing.assert_allclose(seen[0][0], [0.5, 0.5])  # row 0: the mean, init 1/K
  for it in (1, 2, 3):  # row 1: the best so far, re-scored
    np.testing.assert_array_equal(seen[it][1], result.history[it - 1]["alpha_best"])
  assert result.alpha.shape == (2,) and result.alpha.sum() == pytest.approx(1.0)
  uniform = result.history[0]["score_at_mean"]  # the initial mean, α = (1/2, 1/2)
  assert result.best_score > uniform and result.alpha[0] > result.alpha[1]  # towards math
  assert result.history[-1]["score_at_mean"] > uniform  # the refitted mean moved there too
  assert [h["score_best"] for h in result.history] == sorted(h["score_best"]
                                                             for h in result.history)
  assert result.best_score == result.history[-1]["score_best"] and result.best_loglik is None
  h = result.history[0]
  assert set(h) == {"iteration", "score_at_mean", "score_best", "score_population_mean",
                    "score_population_std", "loglik_at_mean", "loglik_best", "alpha_mean",
                    "alpha_std", "alpha_best", "candidates"}
  assert h["alpha_mean"] == [0.5, 0.5] and h["alpha_std"] == [1.0, 1.0]
  assert h["candidates"] <= 11  # rows 0 and 1 (mean = best so far) generated once
  _, per = real(model, pair, result.alpha[None], prompts, shots, task, max_new_tokens=NEW)
  assert per.mean() == result.best_score  # the α returned scores what CEM recorded

  path = str(tmp_path / "alpha.json")
  adapt.save_alpha(path, result, ["math", "code"])
  alpha, names, matrices = adapt.load_alpha(path)
  np.testing.assert_allclose(alpha, result.alpha)
  assert names == ["math", "code"] and matrices == ()
  with open(path) as f:
    assert json.load(f)["history"] == result.history
  assert adapt.plot_history(str(tmp_path / "cem.png"), result.history)
  assert (tmp_path / "cem.png").stat().st_size > 1000


def test_plot_history_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
  history = [{"iteration": 0, "score_at_mean": 0.25, "score_best": 0.5,
              "score_population_mean": 0.3, "score_population_std": 0.1, "loglik_best": -2.0}]
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import → ImportError
  assert adapt.plot_history(str(tmp_path / "cem.png"), history) is False
  assert not (tmp_path / "cem.png").exists()


@pytest.mark.parametrize("per_matrix", [False, True])
def test_no_cem_candidate_rescales_the_model(model, experts, echo, monkeypatch, per_matrix):
  """Three copies of one expert: every candidate CEM generates with must be that expert
  exactly, which holds iff its α sums to 1 (per matrix: every column)."""
  task, prompts, shots = echo
  e = experts["code"]
  rows = []
  real = adapt.generate

  def spy(model_, prompts_, **kwargs):
    rows.extend(kwargs["experts"])
    return real(model_, prompts_, **kwargs)

  monkeypatch.setattr(adapt, "generate", spy)
  result = adapt.few_shot_cem(model, [e, e, e], prompts[:2], shots[:2], task,
                              max_new_tokens=NEW, population=6, elites=2, iterations=2,
                              init_std=1.0, per_matrix=per_matrix)
  assert rows and len(rows) <= 2 * 6 * 2
  for row in rows:
    for k in e.z:
      np.testing.assert_allclose(row.z[k], e.z[k], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(result.candidates.sum(axis=2), 1.0, atol=1e-12)
  assert result.candidates.shape == ((2, 6, 3, len(e.z)) if per_matrix else (2, 6, 3))


def test_ties_in_the_objective_follow_the_reference_loglik(model, experts, echo):
  task, prompts, shots = echo
  ref_task = RefTask(splits=task.splits)
  pair = [experts["math"], experts["code"]]
  result = adapt.few_shot_cem(model, pair, prompts, shots, ref_task, max_new_tokens=NEW,
                              population=8, elites=2, iterations=3, init_std=1.0, seed=1)
  assert all(h["score_best"] == 0.0 for h in result.history)  # the objective never decides
  first = result.history[0]
  assert first["loglik_best"] > first["loglik_at_mean"]
  assert result.best_loglik == result.history[-1]["loglik_best"] >= first["loglik_best"]
  assert result.alpha[0] > 0.5  # the targets are the math expert's own greedy answers
  # without the tie rule, every candidate ties: the first fresh draw (row 2) ranks first
  flat = adapt.few_shot_cem(model, pair, prompts, shots, ref_task, max_new_tokens=NEW,
                            population=8, elites=2, iterations=1, init_std=1.0, seed=1,
                            tie_break=False)
  np.testing.assert_array_equal(flat.alpha, flat.candidates[0, 2])
  assert flat.history[0]["loglik_best"] is None


def test_loglik_objective_ranks_by_the_references_and_generates_only_mean_and_best(
    model, experts, echo, monkeypatch, tmp_path):
  task, prompts, shots = echo
  ref_task = RefTask(splits=task.splits)
  pair = [experts["math"], experts["code"]]
  generated = []
  real = adapt.evaluate_population

  def spy(model_, experts_, alphas, *args, **kwargs):
    generated.append(len(alphas))
    return real(model_, experts_, alphas, *args, **kwargs)

  monkeypatch.setattr(adapt, "evaluate_population", spy)
  result = adapt.few_shot_cem(model, pair, prompts, shots, ref_task, max_new_tokens=NEW,
                              population=8, elites=2, iterations=3, init_std=1.0, seed=1,
                              objective="loglik")
  assert generated == [2, 2, 2]  # the mean and the best per iteration, never the population
  for h in result.history:
    assert h["score_at_mean"] == h["loglik_at_mean"] and h["score_best"] == h["loglik_best"]
    assert h["accuracy_at_mean"] == 0.0 and h["accuracy_best"] == 0.0  # RefTask: never solved
  first, last = result.history[0], result.history[-1]
  assert last["score_at_mean"] > first["score_at_mean"]  # the mean moved up the likelihood
  assert [h["score_best"] for h in result.history] == sorted(h["score_best"]
                                                             for h in result.history)
  assert result.alpha[0] > 0.5  # the references are the math expert's own greedy answers
  assert adapt.plot_history(str(tmp_path / "cem.png"), result.history)
  with pytest.raises(ValueError, match="has none for these shots"):  # no references
    adapt.few_shot_cem(model, pair, prompts, shots, task, max_new_tokens=NEW, population=4,
                       elites=2, iterations=1, objective="loglik")
  with pytest.raises(ValueError, match="objective 'likelihood' is unknown"):
    adapt.few_shot_cem(model, pair, prompts, shots, task, max_new_tokens=NEW, population=4,
                       elites=2, iterations=1, objective="likelihood")


def test_few_shot_per_matrix_alpha(model, experts, echo):
  task, prompts, shots = echo
  pair = [experts["math"], experts["code"]]
  result = adapt.few_shot_cem(model, pair, prompts[:2], shots[:2], task, max_new_tokens=NEW,
                              population=4, elites=2, iterations=1, per_matrix=True)
  keys = sorted(pair[0].z)
  assert result.alpha.shape == (2, len(keys)) and list(result.matrices) == keys
  np.testing.assert_allclose(result.alpha.sum(axis=0), 1.0)
  mixed = adapt.mix(pair, result.alpha, result.matrices)
  k = keys[1]
  np.testing.assert_allclose(mixed.z[k], result.alpha[0, 1] * pair[0].z[k]
                             + result.alpha[1, 1] * pair[1].z[k], rtol=1e-6, atol=1e-7)


def test_few_shot_refuses_test_shots(model, experts, echo):
  task, _, _ = echo
  with pytest.raises(TaskError, match="train or val"):
    adapt.few_shot_records(task, 1, "test")
  assert adapt.few_shot_records(task, 2, "val") == task.records("val")
  test = list(task.records("test"))
  prompts = encode_chats(model.tokenizer, [task.messages(r) for r in test])
  with pytest.raises(TaskError, match="test split"):
    adapt.few_shot_cem(model, list(experts.values()), prompts, test, task, max_new_tokens=NEW,
                       population=2, elites=1, iterations=1)


# ---------------------------------------------------------------------------------------------
# Both passes


def test_two_pass_rows_equal_each_row_alone(model, experts, monkeypatch):
  clock = iter([100.0, 100.25, 101.75])  # start, pass 1 done, pass 2 done
  monkeypatch.setattr(adapt, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
           for q in ["What is 3 + 4?", "Sort a list.", "Is ice cold?", "Name a prime."]]
  labels = ["math", "code", "other"]
  probs = adapt.label_probs(model, [c[-1]["content"] for c in chats], labels, calibrated=True)
  threshold = float(np.median(probs.max(1)))  # some rows dispatched, some mixed
  gen, weights, timing = adapt.two_pass_generate(model, chats, experts, strategy="prompt",
                                                 threshold=threshold, max_new_tokens=3)
  monkeypatch.undo()  # the real clock again
  rows, want_weights = adapt.dispatch(probs, labels, experts, threshold=threshold)
  # pass 1 scored the questions in a batch of another size: float32 rounding apart, the same
  assert [sorted(w) for w in weights] == [sorted(w) for w in want_weights]
  for w, want in zip(weights, want_weights):
    np.testing.assert_allclose([w[k] for k in sorted(w)], [want[k] for k in sorted(w)], atol=1e-5)
  assert any(len(w) == 2 for w in weights) and any(len(w) == 1 for w in weights)
  assert timing == {"pass1_s": 0.25, "pass2_s": 1.5}  # each pass between its clock readings
  for chat, row, text in zip(chats, rows, gen.texts):
    alone = t2jax.generate(model, encode_chats(model.tokenizer, [chat]), max_new_tokens=3,
                           experts=row)
    assert alone.texts[0] == text

  gen, weights, _ = adapt.two_pass_generate(model, chats[:2], experts, strategy="few_shot",
                                            alpha=[0.25, 0.75], max_new_tokens=3)
  assert weights == [{"math": 0.25, "code": 0.75}] * 2
  mixed = t2jax.Expert.mix([experts["math"], experts["code"]], [0.25, 0.75])
  assert gen.texts == t2jax.generate(model, encode_chats(model.tokenizer, chats[:2]),
                                     max_new_tokens=3, experts=mixed).texts
  with pytest.raises(ValueError, match="cls_expert"):
    adapt.two_pass_generate(model, chats, experts, strategy="cls_expert", max_new_tokens=3)


# ---------------------------------------------------------------------------------------------
# The classification task


@dataclasses.dataclass(frozen=True)
class FakeSource:
  """Train questions start with 'train', the others with their split's name."""
  name: str = "fake"
  n: int = 200

  def records(self, split):
    check_split(split)
    return [{"question": f"{split} question {i}?"} for i in range(self.n)]

  def messages(self, record):
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": record["question"]}]


@pytest.fixture
def registry(monkeypatch):
  module = types.ModuleType("t2jax_test_fake_tasks")
  module.FakeSource = FakeSource
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setitem(tasks_lib._REGISTRY, "fake", (module.__name__, "FakeSource"))
  monkeypatch.setitem(tasks_lib._REGISTRY, "cls", ("t2jax.tasks.cls", "Classification"))


def test_cls_records_come_only_from_source_train_splits(registry):
  task = tasks_lib.make_task("cls", {"sources": "math,fake", "per_source": 20, "seed": 3,
                                     "val_fraction": 0.2, "test_fraction": 0.2,
                                     "source_args": {"math": {"level": 1}}})
  assert task.labels == ["math", "fake", "other"]
  splits = {s: task.records(s) for s in ("train", "val", "test")}
  math_train = {r["question"] for r in Arithmetic(level=1).records("train")}
  for recs in splits.values():
    for r in recs:
      assert (r["question"] in math_train if r["label"] == "math"
              else r["question"].startswith("train question"))
  questions = {s: {r["question"] for r in recs} for s, recs in splits.items()}
  assert not (questions["train"] & questions["val"] or questions["train"] & questions["test"]
              or questions["val"] & questions["test"])
  for split, n in (("train", 12), ("val", 4), ("test", 4)):  # balanced: n per label
    assert [r["label"] for r in splits[split]].count("math") == n
    assert [r["label"] for r in splits[split]].count("fake") == n
  # reproducible; the seed picks other prompts, never moves a prompt to another cls split
  assert tasks_lib.make_task("cls", {"sources": "math,fake", "per_source": 20, "seed": 3,
                                     "val_fraction": 0.2, "test_fraction": 0.2,
                                     "source_args": {"math": {"level": 1}}}).records("val") \
      == splits["val"]
  other = Classification(sources="math,fake", per_source=20, seed=4, val_fraction=0.2,
                         test_fraction=0.2, source_args={"math": {"level": 1}})
  assert {r["question"] for r in other.records("train")} & questions["test"] == set()
  with pytest.raises(TaskError, match="too few"):
    Classification(sources="fake", per_source=300).records("train")


def test_cls_prompt_and_reward(registry):
  task = Classification(sources="math,fake", per_source=10, source_args={"math": {"level": 1}})
  math_rec = next(r for r in task.records("train") if r["label"] == "math")
  fake_rec = next(r for r in task.records("train") if r["label"] == "fake")
  # the user text of the source's messages, inside the one shared classification prompt
  assert fake_rec["question"].startswith("train question")
  assert task.messages(math_rec) == classification_messages(math_rec["question"], task.labels)
  user, opening = task.messages(math_rec)
  assert "\\boxed{CATEGORY}" in user["content"]
  assert opening == {"role": "assistant", "content": "\\boxed{"}  # the answer is prefilled
  assert task.reward(math_rec, "math}") == 1.0 and task.reward(fake_rec, " fake }") == 1.0
  assert task.reward(math_rec, "\\boxed{math}") == 1.0
  assert task.reward(math_rec, "It is \\boxed{ Math }.") == 1.0
  assert task.reward(fake_rec, "\\boxed{math}") == -1.0
  assert task.reward(math_rec, "math") == -1.0 and not task.correct(math_rec, "")
  assert extract_label("\\boxed{code} then \\boxed{other}") == "other"
  with pytest.raises(TaskError, match="distinct"):
    Classification(sources="math,other")


# ---------------------------------------------------------------------------------------------
# The adaptation table (python -m t2jax.evaluate --config configs/adapt.py)


def test_generate_cli_prints_each_prompts_mixture(model, experts, tmp_path, capsys):
  import importlib  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  fn = t2jax.generate
  generate_cli = importlib.import_module("t2jax.generate")
  t2jax.generate = fn  # importing the submodule rebinds the package's name to the module

  for name, e in experts.items():
    e.save(str(tmp_path / name))
  spec = f"math={tmp_path / 'math'},code={tmp_path / 'code'}"
  prompts = ["What is 3 + 4?", "Sort a list.", "Is ice cold?"]
  argv = ["--model", model.source, "--experts", spec, "--max-new-tokens", "3"]
  for p in prompts:
    argv += ["--prompt", p]
  assert generate_cli.main(argv + ["--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  _, want, _ = adapt.two_pass_generate(model, prompts, experts, strategy="prompt",
                                       max_new_tokens=3)
  assert out["mixtures"] == want and out["strategy"] == "prompt"
  assert generate_cli.main(argv + ["--slots", "2", "--json"]) == 0  # on the serving engine
  on_engine = json.loads(capsys.readouterr().out)
  assert on_engine["mixtures"] == want and on_engine["token_ids"] == out["token_ids"]
  assert generate_cli.main(argv + ["--strategy", "few_shot", "--alpha", "0.25,0.75",
                                   "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["mixtures"] == [{"math": 0.25, "code": 0.75}] * 3
  assert generate_cli.main(argv) == 0
  shown = capsys.readouterr().out
  assert shown.count("[prompt: ") == 3
  assert generate_cli.main(argv + ["--strategy", "cls_expert"]) == 2
  assert "--strategy cls_expert needs --cls-expert DIR" in capsys.readouterr().err


def test_the_memo_lets_go_of_dropped_models_and_their_caches(model):
  import gc  # pylint: disable=import-outside-toplevel
  import weakref  # pylint: disable=import-outside-toplevel

  twin = t2jax.load_model(model.source)  # a model the test owns, dropped below
  e = t2jax.Expert.init(twin, name="dropped")
  adapt.label_probs(twin, QUESTIONS, LABELS, calibrated=True)
  adapt.label_probs(twin, QUESTIONS, LABELS, expert=e)
  held = len(adapt._MEMO)  # pylint: disable=protected-access
  assert held >= 3  # content-free rows, the base prefix, the expert's prefix
  gone_model, gone_expert = weakref.ref(twin), weakref.ref(e)
  del twin, e
  gc.collect()
  assert gone_model() is None and gone_expert() is None  # nothing in t2jax keeps them
  assert len(adapt._MEMO) <= held - 3  # pylint: disable=protected-access
