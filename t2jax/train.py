"""`python -m t2jax.train --config configs/math.py [--workdir DIR] [--config.key=value ...]`

Trains an SVF expert with REINFORCE (+ KL to the base model); config.adapter = "lora" trains
a LoRA expert instead, and config.objective = "sft" trains by next-token prediction on the
task's reference completions. Running the same command on a workdir that holds a checkpoint
resumes it. Writes to WORKDIR: checkpoints/, metrics.jsonl, tb/ (TensorBoard), best_expert/
(best on val), expert/ (exported at the end), plot.png, summary.json.

From Python, `train(cfg, workdir, hooks=[...])`: the run is `loop` over RL steps, and after
every step each hook is called with (step, state, metrics, last=...): the built-in ones log,
evaluate on val (keeping the best expert) and checkpoint, then the caller's (every process
calls them; `jax.process_index()` tells the lead).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

import t2jax
from t2jax import (atomic, checkpoint, data, distributed, evaluate, programs, reporting,
                   run_setup, sampling, sharding, trainer)


class TrainingError(RuntimeError):
  """Training cannot go on (NaN loss or reward); the message names the step and what was kept."""


class Hook(Protocol):
  """Called after each update with the 1-based step, the new TrainState and the step's
  metrics (floats); `last` on the run's final step."""

  def __call__(self, step: int, state: trainer.TrainState, metrics: dict[str, float], *,
               last: bool) -> None: ...


StepFn = Callable[[trainer.TrainState, int], "tuple[trainer.TrainState, dict[str, float]]"]


def loop(state: trainer.TrainState, steps: range, step_fn: StepFn,
         hooks: Sequence[Hook]) -> trainer.TrainState:
  """Runs step_fn(state, step) for the 0-based `steps`, then every hook, in order."""
  for step in steps:
    state, metrics = step_fn(state, step)
    for hook in hooks:
      hook(step + 1, state, metrics, last=step + 1 == steps.stop)
  return state


def every(n: int, hook: Hook) -> Hook:
  """`hook` at every n-th step and at the last one; never when n is 0."""

  def maybe(step, state, metrics, *, last):
    if n and (step % n == 0 or last):
      hook(step, state, metrics, last=last)

  return maybe


def _load_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: dict) -> None:
  atomic.write_text(path, json.dumps(obj, indent=1))


def train(cfg, workdir: str, *, progress: bool = True, hooks: Sequence[Hook] = ()) -> dict:
  """Runs (or resumes) the training described by `cfg` in `workdir`; returns the summary.
  `hooks` run after the built-in ones at every step (see the module docstring)."""
  setup = run_setup.prepare(cfg)
  model, task = setup.model, setup.task
  lead = jax.process_index() == 0
  train_recs = list(task.records("train"))  # dataset errors surface before anything is written
  eval_recs = {"val": run_setup.eval_subset(task.records("val"), cfg.eval_size),
               "test": run_setup.eval_subset(task.records("test"), cfg.test_size)}
  train_prompts = setup.encode(train_recs)  # tokenised once per run
  eval_prompts = {split: setup.encode(recs) for split, recs in eval_recs.items()}
  # saved with each checkpoint; scan_layers as the layout it resolved to ("auto" resolves
  # differently on another backend, and the stacked state does not restore as a list)
  config_dict = {**cfg.to_dict(), "scan_layers": setup.scanned}
  ckpt = checkpoint.Checkpoints(cfg.checkpoint_dir or os.path.join(workdir, "checkpoints"),
                                keep=cfg.keep_checkpoints)
  ckpt.check_compatible(config_dict, model.fingerprint)

  mesh = sharding.make_mesh(cfg.mesh)
  setup.place(mesh)
  params, factors = setup.params, setup.factors
  # this process's slice of each global batch: the rows its devices hold
  loader_index, loader_count = sharding.process_rows(mesh, cfg.batch_size)
  loader = data.RecordLoader(len(train_recs), global_batch=cfg.batch_size, seed=cfg.seed,
                             process_index=loader_index, process_count=loader_count)
  # one padded prompt length for the run: every process must agree on it, and one shape
  # means one compiled sampler and update
  prompt_len = sampling.bucket_length(max(map(len, train_prompts)))
  progs = programs.build(cfg, model.config, params, factors, mesh=mesh,
                         shapes=programs.Shapes.from_config(cfg, prompt_len),
                         eos_ids=model.eos_ids)
  state = progs.init_state(setup.init_trainable(), cfg.seed)
  sft = cfg.get("objective", "rl") == "sft"
  train_refs = setup.references(train_recs) if sft else None
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, state)
    loader.set_state(data_state)
    print(f"resuming {workdir} from step {start}", file=sys.stderr)

  def score(z_or_none, split: str):
    p = params if z_or_none is None else setup.adapted_params(z_or_none)
    return evaluate.score(p, eval_prompts[split], eval_recs[split], task=task, model=model,
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                          mesh=mesh)

  base_path = os.path.join(workdir, "base_scores.json")
  base = distributed.json_from_lead(_load_json(base_path) if lead else None)
  if base is None:  # measured once per workdir, shown beside the expert
    base = {"val": score(None, "val"), "test": score(None, "test")}
    if lead:
      _write_json(base_path, base)
  best_path = os.path.join(workdir, "best_expert")
  best_val = -math.inf
  if os.path.isdir(best_path):
    best_val = t2jax.load_expert(best_path).metrics.get("val_accuracy", -math.inf)

  def update(state, step: int, rollouts, t0: float, t1: float):
    """The update on this step's batch; stops on a non-finite metric (nothing saved)."""
    state, metrics = progs.update(state, sharding.global_batch(rollouts, mesh), params, factors)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(map(math.isfinite, metrics.values())):
      bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
      raise TrainingError(f"step {step + 1}: {', '.join(bad)} became non-finite; stopped "
                          f"without saving it. Last good checkpoint: step "
                          f"{ckpt.latest_step()} in {ckpt.directory}. Lower config.lr or "
                          "config.kl_coef, or set config.grad_clip.")
    return state, {**metrics, "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1}

  def rl_step(state, step: int):
    """Rollouts of the step's prompts with the current z, scored, then the update."""
    idx = next(loader)
    t0 = time.perf_counter()
    # sampling.run runs progs.prefill and progs.decode: the same jitted functions with the
    # same static arguments (sampling.static_args)
    got = trainer.collect(
        progs.materialise(params, factors, state.z), [train_prompts[i] for i in idx],
        [train_recs[i] for i in idx], task=task, tokenizer=model.tokenizer, cfg=model.config,
        sampler=progs.sampler, samples=cfg.samples_per_prompt, max_new=cfg.max_new_tokens,
        seed=trainer.rollout_seed(state.rng, step), pad_id=model.pad_id,
        eos_ids=model.eos_ids, mesh=mesh, prompt_len=prompt_len)
    t1 = time.perf_counter()
    # sums over the global batch: reward, correct, non-finite rewards, new tokens
    totals = sharding.batch_sum([
        np.nansum(got.rollouts.reward_N), got.correct.sum(),
        (~np.isfinite(got.rollouts.reward_N)).sum(), got.new_tokens], mesh, cfg.batch_size)
    rows = cfg.batch_size * cfg.samples_per_prompt
    if totals[2]:
      raise TrainingError(f"step {step + 1}: the task returned a non-finite reward; nothing "
                          f"was updated. Last checkpoint: step {ckpt.latest_step()} in "
                          f"{ckpt.directory}.")
    state, metrics = update(state, step, got.rollouts, t0, t1)
    metrics.update(
        reward=totals[0] / rows, train_accuracy=totals[1] / rows,
        completion_tokens=totals[3] / rows,
        tokens_per_s=totals[3] / (metrics["rollout_s"] + metrics["update_s"]))
    return state, metrics

  def sft_step(state, step: int):
    """The step's prompts with their reference completions, then the update."""
    idx = next(loader)
    t0 = time.perf_counter()
    batch = trainer.reference_batch([train_prompts[i] for i in idx], [train_refs[i] for i in idx],
                                    pad_id=model.pad_id, prompt_len=prompt_len,
                                    max_new=cfg.max_new_tokens)
    tokens = sharding.batch_sum([batch.completion_mask_NxC.sum()], mesh, cfg.batch_size)[0]
    state, metrics = update(state, step, batch, t0, time.perf_counter())
    metrics.update(completion_tokens=tokens / cfg.batch_size,
                   tokens_per_s=tokens / (metrics["rollout_s"] + metrics["update_s"]))
    return state, metrics

  log = reporting.RunLog(workdir, total_steps=cfg.steps, start_step=start, enabled=lead,
                         progress=progress)

  def log_step(step, state, metrics, *, last):  # pylint: disable=unused-argument
    log.log_step(step, metrics)

  def validate(step, state, metrics, *, last):  # pylint: disable=unused-argument
    nonlocal best_val
    val = score(state.z, "val")
    log.log_eval(step, "val", val)
    if val["accuracy"] > best_val and lead:
      best_val = val["accuracy"]
      setup.expert(state.z, name=f"{cfg.task}-best", metrics={
          "val_accuracy": best_val, "step": step}).save(best_path)

  def save(step, state, metrics, *, last):  # pylint: disable=unused-argument
    ckpt.save(step, state, loader.get_state(), config_dict, model.fingerprint)

  with log:
    state = loop(state, range(start, cfg.steps), sft_step if sft else rl_step,
                 [log_step, every(cfg.eval_every, validate),
                  every(cfg.checkpoint_every, save), *hooks])
  ckpt.wait()
  ckpt.close()
  return _finish(cfg, workdir, setup, state, base, best_path, score, lead)


def _finish(cfg, workdir, setup, state, base, best_path, score, lead) -> dict:
  """Exports the expert (best on val when evaluated, else the last z), scores it on test and
  writes plot.png and summary.json."""
  final = t2jax.load_expert(best_path) if lead and os.path.isdir(best_path) else None
  best_step = distributed.json_from_lead(final.metrics.get("step") if final else None)
  z = jax.device_get(state.z)
  if best_step is not None:
    z = distributed.arrays_from_lead(setup.trainable_of(final) if final else z)
  expert_scores = {"val": score(z, "val"), "test": score(z, "test")}
  rows = {"base": {s: base[s]["accuracy"] for s in ("val", "test")},
          "expert": {s: expert_scores[s]["accuracy"] for s in ("val", "test")}}
  summary = {"task": cfg.task, "steps": cfg.steps, "base": base, "expert": expert_scores,
             "expert_from_step": best_step if best_step is not None else int(state.step)}
  if lead:
    setup.expert(z, name=cfg.task, metrics={
        "val_accuracy": rows["expert"]["val"], "test_accuracy": rows["expert"]["test"],
        "base_val_accuracy": rows["base"]["val"], "base_test_accuracy": rows["base"]["test"],
        "step": summary["expert_from_step"]}).save(os.path.join(workdir, "expert"))
    reporting.plot(os.path.join(workdir, reporting.METRICS_FILE),
                   os.path.join(workdir, "plot.png"),
                   baselines={"base val accuracy": rows["base"]["val"]})
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(reporting.summary_table(rows, ["val", "test"]))
    print(f"expert: {os.path.join(workdir, 'expert')}")
  return summary


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)")
  flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
  flags.mark_flag_as_required("config")

  def run(f):
    config_file = config_flags.get_config_filename(f["config"])
    train(f.config, f.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_file))[0]))

  return run_setup.run_cli(run, argv, errors=(ValueError, TrainingError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(main())
