"""The adaptation table: on each target task's test split, the base model, every single expert,
the oracle (each task's own expert) and the two-pass strategies (prompt, cls_expert, few_shot),
with dispatch accuracy and pass-1 / pass-2 wall times.

  python -m t2jax.evaluate --config configs/adapt.py --workdir W \
      --config.experts=math=runs/math/expert,code=runs/code/expert,... [--config.cls_expert=DIR]

Writes W/results.json (rows: strategy → task → accuracy; dispatch; timing), W/results.md (the
table printed to stdout), W/results.png and one W/few_shot_alpha_<task>.json per task.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np

from t2jax import adapt, atomic, run_setup
from t2jax.expert import Expert
from t2jax.generation import generate
from t2jax.tasks import make_task
from t2jax.tasks.cls import OTHER
from t2jax.tokenizer import encode_chats

KNOWN_STRATEGIES = ("base", "experts", "prompt", "cls_expert", "few_shot")


def parse_experts(spec: str) -> dict[str, str]:
  """"label=DIR,label=DIR" → {label: DIR}, in the order given."""
  out: dict[str, str] = {}
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    label, sep, path = item.partition("=")
    label, path = label.strip(), path.strip()
    if not sep or not label or not path:
      raise ValueError(f"config.experts item {item!r} is not LABEL=DIR "
                       "(e.g. math=runs/math/expert).")
    if label in out or label == OTHER:
      raise ValueError(f"config.experts: label {label!r} is repeated or reserved ({OTHER!r} "
                       "means the base model).")
    out[label] = path
  if not out:
    raise ValueError("config.experts is empty: give LABEL=DIR,... (e.g. math=runs/math/expert).")
  return out


def _load_expert(label: str, path: str, model) -> Expert:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"expert {label!r}: {path} is not a directory (an expert saved by "
                            "python -m t2jax.train, e.g. runs/math/expert).")
  e = Expert.load(path)
  e.check(model)  # a clear error now, not in the middle of the table
  return e


class _Suite:
  """One target task's test records, prompts and scorer."""

  def __init__(self, name: str, task, records: Sequence[dict], model, max_new_tokens: int):
    self.name, self.task, self.records = name, task, list(records)
    self.chats = [task.messages(r) for r in self.records]
    self.tokens = encode_chats(model.tokenizer, self.chats)
    self.max_new_tokens = int(max_new_tokens)

  def accuracy(self, texts: Sequence[str]) -> float:
    return float(np.mean([self.task.correct(r, t) for r, t in zip(self.records, texts)]))


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def _padded(items: list, size: int) -> list:
  """One shape per eval: the last chunk repeats its last item up to `size`."""
  return items + [items[-1]] * (size - len(items))


def _generate_rows(model, suite: _Suite, experts, batch: int) -> list[str]:
  """Greedy completions of every suite prompt; experts: None, one Expert, or one per row."""
  texts = []
  for lo, hi in _chunks(len(suite.tokens), batch):
    rows = experts[lo:hi] if isinstance(experts, list) else experts
    chunk = _padded(suite.tokens[lo:hi], batch)
    if isinstance(rows, list):
      rows = _padded(rows, batch)
    gen = generate(model, chunk, max_new_tokens=suite.max_new_tokens, temperature=0.0,
                         experts=rows)
    texts += gen.texts[:hi - lo]
  return texts


def _two_pass(model, suite: _Suite, experts: dict[str, Expert], batch: int, **kw
              ) -> tuple[list[str], list[dict], dict[str, float]]:
  texts, weights, timing = [], [], {"pass1_s": 0.0, "pass2_s": 0.0}
  for lo, hi in _chunks(len(suite.chats), batch):
    gen, w, t = adapt.two_pass_generate(model, _padded(suite.chats[lo:hi], batch), experts,
                                        max_new_tokens=suite.max_new_tokens, batch_size=batch,
                                        **kw)
    texts += gen.texts[:hi - lo]
    weights += w[:hi - lo]
    for k in timing:
      timing[k] += t[k]
  return texts, weights, timing


def chosen_label(weights: dict[str, Any]) -> str:
  """The label a row was sent to: {} = the base model ("other"), else the heaviest expert."""
  return max(weights, key=lambda k: float(np.sum(weights[k]))) if weights else OTHER


def dispatch_summary(chosen: dict[str, list[str]], labels: Sequence[str]) -> dict:
  """Accuracy of pass 1 (a task's prompts should go to the expert of the same name, or to
  "other" when no expert has its name) and the confusion matrix task → label → count."""
  confusion = {task: {lab: picks.count(lab) for lab in labels} for task, picks in chosen.items()}
  right = sum(picks.count(task if task in labels else OTHER) for task, picks in chosen.items())
  total = sum(len(p) for p in chosen.values())
  return {"accuracy": right / total if total else float("nan"), "labels": list(labels),
          "confusion": confusion}


def markdown_table(rows: dict[str, dict[str, float]], tasks: Sequence[str]) -> str:
  head = "| | " + " | ".join(tasks) + " | mean |"
  lines = [head, "|" + "---|" * (len(tasks) + 2)]
  for name, accs in rows.items():
    cells = [f"{100 * accs[t]:.1f}" for t in tasks]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * np.mean(list(accs.values())):.1f} |")
  return "\n".join(lines)


def plot(path: str, rows: dict[str, dict[str, float]], tasks: Sequence[str]) -> bool:
  """Grouped bars: one group per task (+ mean), one bar per row. False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  groups = list(tasks) + ["mean"]
  width = 0.8 / max(len(rows), 1)
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4))
  for i, (name, accs) in enumerate(rows.items()):
    values = [accs[t] for t in tasks] + [float(np.mean(list(accs.values())))]
    ax.bar(np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width,
           [100 * v for v in values], width, label=name)
  ax.set_xticks(np.arange(len(groups)), groups)
  ax.set_ylabel("test accuracy (%)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def run(cfg, workdir: str) -> dict:
  import t2jax  # pylint: disable=import-outside-toplevel

  strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
  unknown = sorted(set(strategies) - set(KNOWN_STRATEGIES))
  if unknown:
    raise ValueError(f"config.strategies has {unknown}; use some of {KNOWN_STRATEGIES}.")
  if "cls_expert" in strategies and not cfg.cls_expert:
    strategies.remove("cls_expert")  # nothing to score it with: the row is left out
  paths = parse_experts(cfg.experts)
  task_names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
  if not task_names:
    raise ValueError("config.tasks is empty: name the target tasks, e.g. math,code,reasoning.")
  missing = [t for t in task_names if t not in cfg.max_new_tokens]
  if missing:
    raise ValueError(f"config.max_new_tokens has no entry for task(s) {missing}.")
  os.makedirs(workdir, exist_ok=True)

  model = t2jax.load_model(cfg.model or None, dtype=cfg.dtype)
  experts = {label: _load_expert(label, p, model) for label, p in paths.items()}
  cls_expert = _load_expert("cls", cfg.cls_expert, model) if cfg.cls_expert else None
  suites = []
  for name in task_names:
    args = cfg.task_args[name].to_dict() if name in cfg.task_args else {}
    task = make_task(name, args)
    records = run_setup.eval_subset(task.records("test"), cfg.eval_size)
    suites.append(_Suite(name, task, records, model, cfg.max_new_tokens[name]))
  batch = int(cfg.eval_batch_size)
  labels = list(experts) + [OTHER]

  rows: dict[str, dict[str, float]] = {}
  timing: dict[str, Any] = {}
  dispatch: dict[str, Any] = {}
  log = lambda msg: print(f"[adapt {time.strftime('%H:%M:%S')}] {msg}", flush=True)
  if "base" in strategies:
    rows["base"] = {s.name: s.accuracy(_generate_rows(model, s, None, batch)) for s in suites}
    log(f"base {rows['base']}")
  if "experts" in strategies:
    for label, e in experts.items():
      rows[f"expert:{label}"] = {s.name: s.accuracy(_generate_rows(model, s, e, batch))
                                 for s in suites}
      log(f"expert:{label} {rows[f'expert:{label}']}")
    # the right expert per task (the base model for a task no expert is named after)
    rows["oracle"] = {s.name: rows[f"expert:{s.name}"][s.name] if s.name in experts
                      else rows.get("base", {}).get(s.name, float("nan")) for s in suites}
  for strategy in ("prompt", "cls_expert"):
    if strategy not in strategies:
      continue
    accs, chosen, times = {}, {}, {}
    for s in suites:
      texts, weights, t = _two_pass(model, s, experts, batch, strategy=strategy,
                                    threshold=float(cfg.threshold), cls_expert=cls_expert,
                                    calibrated=bool(cfg.calibrated))
      accs[s.name], times[s.name] = s.accuracy(texts), t
      chosen[s.name] = [chosen_label(w) for w in weights]
    rows[strategy], timing[strategy] = accs, times
    dispatch[strategy] = dispatch_summary(chosen, labels)
    log(f"{strategy} {accs}; dispatch accuracy {dispatch[strategy]['accuracy']:.3f}")
  if "few_shot" in strategies:
    rows["few_shot"], timing["few_shot"] = {}, {}
    fs = cfg.few_shot
    order = list(experts)
    for s in suites:
      shots = adapt.few_shot_records(s.task, int(fs.shots), fs.split, seed=int(cfg.seed))
      t0 = time.perf_counter()
      found = adapt.few_shot_cem(
          model, [experts[n] for n in order], encode_chats(model.tokenizer,
                                                           [s.task.messages(r) for r in shots]),
          shots, s.task, max_new_tokens=s.max_new_tokens, population=int(fs.population),
          elites=int(fs.elites), iterations=int(fs.iterations), init_std=float(fs.init_std),
          per_matrix=bool(fs.per_matrix), seed=int(cfg.seed), objective=fs.objective)
      search_s = time.perf_counter() - t0
      adapt.save_alpha(os.path.join(workdir, f"few_shot_alpha_{s.name}.json"), found, order)
      texts, _, t = _two_pass(model, s, experts, batch, strategy="few_shot", alpha=found.alpha,
                              matrices=found.matrices)
      rows["few_shot"][s.name] = s.accuracy(texts)
      timing["few_shot"][s.name] = {**t, "search_s": search_s,
                                    "alpha": np.asarray(found.alpha).round(4).tolist()}
      log(f"few_shot {s.name}: {rows['few_shot'][s.name]:.3f}, alpha {found.alpha}")

  # Pass-1 vs pass-2 time with warm compiles: the prompt strategy once more on each suite.
  if "prompt" in strategies:
    timing["warm_prompt"] = {
        s.name: _two_pass(model, s, experts, batch, strategy="prompt",
                          threshold=float(cfg.threshold), calibrated=bool(cfg.calibrated))[2]
        for s in suites}
    for t in timing["warm_prompt"].values():
      t["pass1_fraction"] = t["pass1_s"] / t["pass2_s"]

  tasks = [s.name for s in suites]
  result = {"tasks": tasks, "eval_size": {s.name: len(s.records) for s in suites},
            "experts": paths, "cls_expert": cfg.cls_expert or None, "rows": rows,
            "mean": {name: float(np.mean(list(a.values()))) for name, a in rows.items()},
            "dispatch": dispatch, "timing": timing, "config": cfg.to_dict()}
  table = markdown_table(rows, tasks)
  atomic.write_text(os.path.join(workdir, "results.json"), json.dumps(result, indent=1))
  atomic.write_text(os.path.join(workdir, "results.md"), table + "\n")
  plotted = plot(os.path.join(workdir, "results.png"), rows, tasks)
  print(table)
  for strategy, d in dispatch.items():
    print(f"dispatch {strategy}: accuracy {100 * d['accuracy']:.1f}% "
          f"confusion {json.dumps(d['confusion'])}")
  for name, t in timing.get("warm_prompt", {}).items():
    print(f"warm prompt strategy on {name}: pass 1 {t['pass1_s']:.2f}s, pass 2 "
          f"{t['pass2_s']:.2f}s ({100 * t['pass1_fraction']:.1f}% of pass 2)")
  print(f"wrote {os.path.join(workdir, 'results.json')}"
        + (" and results.png" if plotted else " (no matplotlib: no chart)"))
  return result

