"""`python -m t2jax.reproduce --config configs/paper_mini.py --workdir runs/paper`

The paper's Tables 1 and 2 in miniature, in one command: trains every expert of the config
(each in its own process: W/experts/<name>, skipped when finished, resumed from its last
checkpoint when interrupted), the classification expert likewise, then scores Table 1 (each
expert vs base on its own task's test split) and Table 2 (base, each expert, prompt,
cls_expert and few_shot on target tasks no expert saw) with 95 % bootstrap intervals. Every
finished evaluation cell is kept under W/cells, so rerunning the same command after an
interruption goes on where it stopped. Prints progress and an estimate of the time left;
writes W/results.json, W/results.md, W/results.png (+ results_own.png, few-shot histories).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import ml_collections

from t2jax import adapt_eval, atomic, checkpoint
from t2jax.config_defaults import config_module

EXPERTS_DIR = "experts"
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


def _log(msg: str) -> None:
  print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _hms(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def config_path(name: str) -> str:
  """A training config by file name (configs/<name>) or by path."""
  path = name if os.path.isfile(name) else os.path.join(CONFIGS_DIR, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"training config {name!r} is neither a file nor one of "
                            f"{sorted(os.listdir(CONFIGS_DIR))} in {CONFIGS_DIR}.")
  return path


def training_config(spec) -> ml_collections.ConfigDict:
  """The training config of one expert: its config file's get_config() with the spec's
  overrides. Top-level keys must exist (a typo is an error); task_args may gain keys (a
  task's own settings, checked by the task)."""
  cfg = config_module(config_path(spec.config)).get_config()
  overrides = spec.overrides.to_dict() if "overrides" in spec else {}
  for key, value in overrides.items():
    if key == "task_args":
      for k, v in value.items():
        cfg.task_args[k] = v
    elif key not in cfg:
      raise ValueError(f"expert {spec.config}: override {key!r} is not a key of that config.")
    else:
      cfg[key] = value
  return cfg


def train_one(config_file: str, overrides_json: str, workdir: str) -> None:
  """Child-process entry: trains (or resumes) one expert. Run by `train_expert`."""
  from t2jax import train  # pylint: disable=import-outside-toplevel

  spec = ml_collections.ConfigDict({"config": config_file,
                                    "overrides": json.loads(overrides_json)})
  train.train(training_config(spec), workdir, progress=False)


def expert_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, EXPERTS_DIR, name)


def is_trained(run_dir: str) -> bool:
  return (os.path.isfile(os.path.join(run_dir, "summary.json"))
          and os.path.isfile(os.path.join(run_dir, "expert", "expert.json")))


CONFIG_FILE = "training_config.json"


def check_run_config(run_dir: str, cfg) -> None:
  """Refuses a run directory that holds a run of another training config (a changed recipe
  must not silently reuse the old expert; the old run is never overwritten: the user moves it);
  records the config of a new run (or of one from before this file existed)."""
  path = os.path.join(run_dir, CONFIG_FILE)
  want = json.loads(cfg.to_json_best_effort(sort_keys=True))
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      had = json.load(f)
    # as a resume compares them: a key added since (scan_layers) has the value older runs had
    keys = sorted(k for k in set(had) | set(want)
                  if checkpoint.config_value(had, k) != checkpoint.config_value(want, k))
    if keys:
      raise ValueError(f"{run_dir} holds a run of another training config (it differs in "
                       f"{keys}): move or delete that directory to train with the current "
                       "config, or restore the old settings.")
    return
  os.makedirs(run_dir, exist_ok=True)
  atomic.write_text(path, json.dumps(want, indent=1, sort_keys=True))


def steps_done(run_dir: str) -> tuple[int, float | None]:
  """(steps logged in metrics.jsonl, mean seconds per step or None): resume progress and the
  measured pace of this run."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return 0, None
  steps, secs = 0, []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("kind") == "train":
        steps = max(steps, int(rec.get("step", 0)))
        secs.append(float(rec.get("rollout_s", 0)) + float(rec.get("update_s", 0)))
  return steps, (sum(secs) / len(secs) if secs else None)


class Plan:
  """Progress and the time-left estimate: training by steps (each run's measured pace, else
  the config's prior), evaluation by work units (records × new tokens) at the pace measured
  on this run's fresh cells, else a prior."""

  def __init__(self, cfg, workdir: str, specs: dict):
    self.cfg, self.workdir, self.specs = cfg, workdir, specs
    self.eval_units = 0
    self.units_done = 0
    self.fresh_units, self.fresh_s = 0, 0.0
    self.start = time.time()
    # wall time of every invocation, so the total over interruptions can be stated
    self.wall_path = os.path.join(workdir, "wall.json")
    self.earlier = []
    if os.path.isfile(self.wall_path):
      with open(self.wall_path, encoding="utf-8") as f:
        self.earlier = json.load(f)["invocations"]

  def total_wall_s(self) -> float:
    return sum(self.earlier) + time.time() - self.start

  def save_wall(self) -> None:
    atomic.write_text(self.wall_path, json.dumps(
        {"invocations": self.earlier + [time.time() - self.start]}))

  def training_left_s(self) -> float:
    total = 0.0
    for name, spec in self.specs.items():
      run = expert_dir(self.workdir, name)
      if is_trained(run):
        continue
      done, pace = steps_done(run)
      steps = int(training_config(spec).steps)
      total += (steps - done) * (pace or float(spec.prior_step_s)) + float(spec.prior_eval_s)
    return total

  def eval_left_s(self) -> float:
    pace = (self.fresh_s / self.fresh_units if self.fresh_units
            else float(self.cfg.prior_eval_s_per_unit))
    return max(self.eval_units - self.units_done, 0) * pace

  def report(self, what: str) -> None:
    left = self.training_left_s() + self.eval_left_s()
    self.save_wall()
    _log(f"{what} — elapsed {_hms(time.time() - self.start)} (all runs {_hms(self.total_wall_s())}),"
         f" estimated time left {_hms(left)}")

  def on_cell(self, what: str, units: int, seconds: float | None) -> None:
    self.units_done += units
    if seconds is not None:
      self.fresh_units += units
      self.fresh_s += seconds
    self.report(f"cell {what} done ({self.units_done}/{self.eval_units} work units)")


def train_expert(name: str, spec, workdir: str, plan: Plan) -> str:
  """Trains one expert in a child process (fresh memory, its own jit caches); skips a
  finished run; a run with checkpoints resumes. Returns the expert directory."""
  run = expert_dir(workdir, name)
  if is_trained(run):
    _log(f"expert {name}: already trained ({run})")
    return os.path.join(run, "expert")
  done, _ = steps_done(run)
  cfg = training_config(spec)  # a bad override fails here, before any child starts
  plan.report(f"training {name} ({spec.config}, {cfg.steps} steps"
              + (f", resuming after step {done}" if done else "") + f") in {run}")
  os.makedirs(run, exist_ok=True)
  code = ("import sys; from t2jax import reproduce; "
          "reproduce.train_one(sys.argv[1], sys.argv[2], sys.argv[3])")
  overrides = json.dumps(spec.overrides.to_dict() if "overrides" in spec else {})
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", code, config_path(spec.config), overrides, run],
                        check=False)
  if proc.returncode != 0 or not is_trained(run):
    raise RuntimeError(f"training expert {name} failed (exit {proc.returncode}); its log is "
                       f"above and {run}/metrics.jsonl. Rerun the same command to resume.")
  _log(f"expert {name}: trained in {_hms(time.time() - t0)}")
  return os.path.join(run, "expert")


def own_suites(cfg, names: Sequence[str]) -> list[adapt_eval.Suite]:
  """Table 1's suites: each expert's own training task (as its config trains it), test split."""
  out = []
  for name in names:
    tc = training_config(cfg.train[name])
    out.append(adapt_eval.make_suite(name, tc.task, tc.task_args.to_dict(), int(cfg.own_size),
                                     int(tc.max_new_tokens)))
  return out


def eval_units(cfg, own: Sequence[adapt_eval.Suite], target: Sequence[adapt_eval.Suite],
               experts: int, baseline_labels: Sequence[str] = ()) -> int:
  """Work units (records × new tokens) of every evaluation cell, for the estimate. A baseline
  row is scored on its label's own and target task."""
  strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
  rows = (("base" in strategies) + experts * ("experts" in strategies)
          + ("prompt" in strategies) + ("cls_expert" in strategies)
          + ("few_shot" in strategies))
  units = sum(2 * len(s.records) * s.max_new_tokens for s in own)
  units += sum(len(s.records) * s.max_new_tokens for s in [*own, *target]
               for label in baseline_labels if s.label == label)
  for s in target:
    units += rows * len(s.records) * s.max_new_tokens
    if "prompt" in strategies:
      units += adapt_eval.warm_units(int(cfg.eval_batch_size), s)
    if "few_shot" in strategies:
      units += adapt_eval.search_units(cfg.few_shot, s.max_new_tokens)
  return units


def reproduce(cfg, workdir: str) -> dict:
  names = list(cfg.train)
  specs = {name: cfg.train[name] for name in names}
  if cfg.cls.config:
    specs["cls"] = cfg.cls
  baselines = dict(cfg.get("baselines_train", {}))
  for row, spec in baselines.items():
    if spec.label not in names or row in specs:
      raise ValueError(f"baselines_train.{row}: label {spec.label!r} must be one of the "
                       f"experts {names}, and {row!r} not a name already used.")
    specs[row] = spec
  # every config, override and run directory is checked before hours are spent
  for name, spec in specs.items():
    check_run_config(expert_dir(workdir, name), training_config(spec))
  own, target = own_suites(cfg, names), adapt_eval.target_suites(cfg)  # and every task
  plan = Plan(cfg, workdir, specs)
  os.makedirs(workdir, exist_ok=True)
  paths = {name: train_expert(name, specs[name], workdir, plan) for name in names}
  cls_path = train_expert("cls", cfg.cls, workdir, plan) if cfg.cls.config else None
  baseline_paths = {row: train_expert(row, spec, workdir, plan) for row, spec in baselines.items()}

  eval_cfg = ml_collections.ConfigDict(cfg.to_dict())
  eval_cfg.experts = ",".join(f"{n}={p}" for n, p in paths.items())
  eval_cfg.cls_expert = cls_path or ""
  eval_cfg.baselines = ",".join(f"{row}:{baselines[row].label}={p}"
                                for row, p in baseline_paths.items())
  ctx, _ = adapt_eval.setup(eval_cfg, workdir, _log)
  plan.eval_units = eval_units(eval_cfg, own, target, len(paths),
                               [spec.label for spec in baselines.values()])
  ctx.progress = plan.on_cell
  plan.report(f"evaluating: Table 1 on {[s.task_name for s in own]}, Table 2 on "
              f"{[s.task_name for s in target]}")
  result = adapt_eval.run(eval_cfg, workdir, own, ctx=ctx, log=_log)
  result["training"] = {n: _summary(expert_dir(workdir, n)) for n in names + (
      ["cls"] if cls_path else []) + list(baselines)}
  plan.save_wall()
  result["wall_s"] = {"this_invocation": time.time() - plan.start,
                      "all_invocations": plan.total_wall_s(),
                      "invocations": len(plan.earlier) + 1}
  atomic.write_text(os.path.join(workdir, "results.json"), json.dumps(result, indent=1))
  lines = ["## Training runs (each run's own summary.json)", "",
           "| expert | steps | base test | expert test | expert from step |", "|---|---|---|---|---|"]
  for name, t in result["training"].items():
    lines.append(f"| {name} | {t['steps']} | {100 * t['test']['base']:.1f} | "
                 f"{100 * t['test']['expert']:.1f} | {t['expert_from_step']} |")
  w = result["wall_s"]
  lines += ["", f"Wall time: {_hms(w['all_invocations'])} over {w['invocations']} "
            f"invocation(s) of `python -m t2jax.reproduce` (this one {_hms(w['this_invocation'])})."]
  atomic.write_text(os.path.join(workdir, "results.md"),
                    adapt_eval.report(result) + "\n" + "\n".join(lines) + "\n")
  _log(f"done: {_hms(result['wall_s']['this_invocation'])} this invocation, "
       f"{_hms(result['wall_s']['all_invocations'])} over {result['wall_s']['invocations']} "
       "invocation(s)")
  return result


def _summary(run_dir: str) -> dict[str, Any]:
  with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
    s = json.load(f)
  return {"steps": s.get("steps"), "test": {k: s[k]["test"]["accuracy"]
                                            for k in ("base", "expert")},
          "expert_from_step": s.get("expert_from_step")}


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from t2jax import run_setup  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "configs/paper_mini.py")
  flags.DEFINE_string("workdir", None, "where experts, cells and results go (e.g. runs/paper)")
  flags.mark_flags_as_required(["config", "workdir"])
  return run_setup.run_cli(lambda f: reproduce(f.config, f.workdir), argv,
                           errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
  sys.exit(main())
