"""The adaptation tables, as the paper measures them (Tables 1 and 2), with 95 % bootstrap
intervals over records:

  own tasks     each expert vs the base model on the test split of the task it trained on
  target tasks  base, every single expert and the two-pass strategies (prompt, cls_expert,
                few_shot) on target tasks, with dispatch accuracy and pass-1 / pass-2 times

  python -m t2jax.evaluate --config configs/adapt.py --workdir W \
      --config.experts=math=runs/math/expert,code=runs/code/expert,... [--config.cls_expert=DIR]

Every (row, task) cell is one file under W/cells/ holding each record's outcome, written once
it is complete: a rerun after an interruption reuses finished cells (and recomputes a cell
whose settings changed). Writes W/results.json, W/results.md (the tables printed to stdout),
W/results.png, and per target task W/few_shot_alpha_<label>.json and its search history plot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from t2jax import adapt, atomic, lora, run_setup, stats
from t2jax.expert import Expert, load_any
from t2jax.generation import generate
from t2jax.tasks import make_task
from t2jax.tasks.cls import OTHER, PROMPT_STYLES
from t2jax.tokenizer import encode_chats

KNOWN_STRATEGIES = ("base", "experts", "prompt", "cls_expert", "few_shot")
CELLS = "cells"


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


def parse_tasks(spec: str) -> dict[str, str]:
  """"math=math_word,code=humaneval,reasoning" → {label: task name}: each target task with
  the label its prompts should be dispatched to (a bare name is its own label)."""
  out: dict[str, str] = {}
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    label, _, task = item.partition("=")
    label, task = label.strip(), (task.strip() or label.strip())
    if label in out:
      raise ValueError(f"config.tasks: label {label!r} is repeated.")
    out[label] = task
  if not out:
    raise ValueError("config.tasks is empty: name the target tasks, e.g. "
                     "math=math_word,code=humaneval,reasoning.")
  return out


def parse_baselines(spec: str, labels: Sequence[str]) -> dict[str, dict[str, str]]:
  """config.baselines "ROW:LABEL=DIR,..." → {row: {label: dir}}: other experts (LoRA, or SVF
  trained otherwise) scored as row ROW on the own task of expert LABEL."""
  out: dict[str, dict[str, str]] = {}
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    key, eq, path = item.partition("=")
    row, colon, label = key.strip().partition(":")
    if not (eq and colon and row and label and path.strip()):
      raise ValueError(f"config.baselines item {item!r} is not ROW:LABEL=DIR "
                       "(e.g. lora_sft:math=runs/math_lora_sft/expert).")
    if label not in labels:
      raise ValueError(f"config.baselines item {item!r}: label {label!r} is not one of the "
                       f"experts' labels {list(labels)}.")
    if row in ("base", "expert") or label in out.get(row, {}):
      raise ValueError(f"config.baselines: row {row!r} is reserved or repeated for {label!r}.")
    out.setdefault(row, {})[label] = path.strip()
  return out


def load_expert(label: str, path: str, model, *, svf_only: bool = True):
  """The expert at `path` checked against model; svf_only: it is mixed (a two-pass expert),
  which LoRA experts cannot be."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"expert {label!r}: {path} is not a directory (an expert saved by "
                            "python -m t2jax.train, e.g. runs/math/expert).")
  e = load_any(path)
  if svf_only and not isinstance(e, Expert):
    raise ValueError(f"expert {label!r}: {path} is a LoRA expert; two-pass adaptation mixes "
                     "SVF experts' z. Score it as a baseline row (config.baselines).")
  e.check(model)  # a clear error now, not in the middle of the table
  return e


def num_params(e) -> int:
  """Trained parameters of an expert: z's entries (SVF) or r·(in + out) per matrix (LoRA)."""
  if isinstance(e, lora.LoRAExpert):
    return e.num_params
  return int(sum(np.size(z) for z in e.z.values()))


@dataclasses.dataclass
class Suite:
  """One task's scored records: `label` is the expert its prompts belong to (what dispatch
  should pick; a label without an expert means the base model, "other")."""
  label: str
  task_name: str
  task: Any
  records: list
  max_new_tokens: int
  settings: dict  # what the cells' outcomes depend on, hashed into their keys

  def __post_init__(self):
    self.chats = [self.task.messages(r) for r in self.records]

  def tokens(self, model) -> list[list[int]]:
    return encode_chats(model.tokenizer, self.chats)

  def outcomes(self, texts: Sequence[str]) -> np.ndarray:
    """1.0 where the completion solves its record, else 0.0 [N]."""
    return np.array([float(self.task.correct(r, t)) for r, t in zip(self.records, texts)])


def make_suite(label: str, task_name: str, task_args: dict, size: int, max_new_tokens: int,
               split: str = "test") -> Suite:
  task = make_task(task_name, task_args)
  records = run_setup.eval_subset(task.records(split), size)
  settings = {"task": task_name, "task_args": task_args, "split": split, "size": len(records),
              "max_new_tokens": int(max_new_tokens),
              "records": hashlib.sha256(json.dumps(records, sort_keys=True, default=str)
                                        .encode()).hexdigest()[:16]}
  return Suite(label, task_name, task, records, int(max_new_tokens), settings)


def expert_id(e) -> str:
  """What a cell's outcomes depend on in an expert: its z (hashed) and its SVF space, or a
  LoRA expert's factors and scale."""
  if e is None:
    return "base"
  if isinstance(e, lora.LoRAExpert):
    h = hashlib.sha256(json.dumps(["lora", e.fingerprint, e.targets, e.rank, e.alpha]).encode())
    for k in sorted(e.factors):
      for part in ("a", "b"):
        h.update(f"{k}.{part}".encode())
        h.update(np.ascontiguousarray(e.factors[k][part], np.float32).tobytes())
    return h.hexdigest()[:16]
  h = hashlib.sha256(json.dumps([e.fingerprint, e.targets, e.rank, e.parametrisation,
                                 e.max_mult]).encode())
  for k in sorted(e.z):
    h.update(k.encode())
    h.update(np.ascontiguousarray(e.z[k], np.float32).tobytes())
  return h.hexdigest()[:16]


class Cells:
  """Finished cells on disk: W/cells/<table>__<row>__<label>.json, keyed by a hash of what
  produced them. `get` returns a cell only when its key matches, so a changed setting or
  expert recomputes it instead of mixing runs."""

  def __init__(self, workdir: str, log: Callable[[str], None]):
    self.dir = os.path.join(workdir, CELLS)
    self.log = log
    os.makedirs(self.dir, exist_ok=True)

  def _path(self, table: str, row: str, label: str) -> str:
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "-" for c in s)
    return os.path.join(self.dir, f"{safe(table)}__{safe(row)}__{safe(label)}.json")

  @staticmethod
  def key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

  def get(self, table: str, row: str, label: str, key: str) -> dict | None:
    path = self._path(table, row, label)
    if not os.path.isfile(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        cell = json.load(f)
    except (OSError, json.JSONDecodeError):
      self.log(f"{path} is unreadable: recomputing it")
      return None
    if cell.get("key") != key:
      self.log(f"{path} was made with other settings or experts: recomputing it")
      return None
    return cell

  def put(self, table: str, row: str, label: str, key: str, cell: dict) -> dict:
    cell = {"key": key, "table": table, "row": row, "label": label, **cell}
    atomic.write_text(self._path(table, row, label), json.dumps(cell))
    return cell


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def _padded(items: list, size: int) -> list:
  """One shape per eval: the last chunk repeats its last item up to `size`."""
  return items + [items[-1]] * (size - len(items))


def generate_rows(model, suite: Suite, experts, batch: int) -> list[str]:
  """Greedy completions of every suite prompt; experts: None, one Expert, or one per row."""
  texts, tokens = [], suite.tokens(model)
  for lo, hi in _chunks(len(tokens), batch):
    rows = experts[lo:hi] if isinstance(experts, list) else experts
    if isinstance(rows, list):
      rows = _padded(rows, batch)
    gen = generate(model, _padded(tokens[lo:hi], batch), max_new_tokens=suite.max_new_tokens,
                   temperature=0.0, experts=rows)
    texts += gen.texts[:hi - lo]
  return texts


def two_pass_rows(model, suite: Suite, experts: dict[str, Expert], batch: int, **kw
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
  """Accuracy of pass 1 (a suite's prompts should go to the expert of its label, or to
  "other" when no expert has that label) and the confusion matrix suite → label → count."""
  confusion = {task: {lab: picks.count(lab) for lab in labels} for task, picks in chosen.items()}
  right = sum(picks.count(task if task in labels else OTHER) for task, picks in chosen.items())
  total = sum(len(p) for p in chosen.values())
  return {"accuracy": right / total if total else float("nan"), "labels": list(labels),
          "confusion": confusion}


# ---------------------------------------------------------------------------------------------
# Statistics over cells


def interval(outcomes: Sequence[float], seed: int) -> dict[str, float]:
  mean, lo, hi = stats.bootstrap_ci(np.asarray(outcomes, np.float64), seed=seed)
  return {"accuracy": mean, "lo": lo, "hi": hi, "n": len(outcomes)}


def paired(a: Sequence[float], b: Sequence[float], seed: int) -> dict[str, Any]:
  """a − b over the same records, with its 95 % interval; `differs` is False when the
  interval holds 0 (reported as no difference)."""
  diff, lo, hi = stats.paired_diff_ci(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                      seed=seed)
  return {"diff": diff, "lo": lo, "hi": hi, "differs": bool(stats.differs(lo, hi))}


def cell_text(c: dict) -> str:
  return stats.format_ci(c["accuracy"], c["lo"], c["hi"])


def diff_text(d: dict) -> str:
  return (stats.format_ci(d["diff"], d["lo"], d["hi"], signed=True)
          + ("" if d["differs"] else " (no difference)"))


def markdown_table(rows: dict[str, dict[str, dict]], labels: Sequence[str],
                   headers: Sequence[str] | None = None) -> str:
  """rows: name → label → interval(); each cell 'acc [lo, hi]' in percent."""
  lines = ["| | " + " | ".join(headers or labels) + " |", "|" + "---|" * (len(labels) + 1)]
  for name, cells in rows.items():
    lines.append(f"| {name} | " + " | ".join(cell_text(cells[lab]) if lab in cells else "–"
                                             for lab in labels) + " |")
  return "\n".join(lines)


def plot(path: str, rows: dict[str, dict[str, dict]], labels: Sequence[str],
         title: str = "") -> bool:
  """Grouped bars with 95 % interval whiskers: one group per task, one bar per row. False
  without matplotlib."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  width = 0.8 / max(len(rows), 1)
  fig, ax = plt.subplots(figsize=(2 + 2.2 * len(labels), 4))
  for i, (name, cells) in enumerate(rows.items()):
    x = np.arange(len(labels)) + (i - (len(rows) - 1) / 2) * width
    acc = np.array([cells[lab]["accuracy"] if lab in cells else np.nan for lab in labels])
    err = np.array([[cells[lab]["accuracy"] - cells[lab]["lo"], cells[lab]["hi"]
                     - cells[lab]["accuracy"]] if lab in cells else [0, 0] for lab in labels])
    ax.bar(x, 100 * acc, width, yerr=100 * err.T, capsize=2, label=name)
  ax.set_xticks(np.arange(len(labels)), labels)
  ax.set_ylabel("test accuracy (%), 95 % interval")
  if title:
    ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


# ---------------------------------------------------------------------------------------------
# The tables


@dataclasses.dataclass
class Context:
  """What every cell needs: the model, the experts by label, the cache of finished cells."""
  model: Any
  experts: dict[str, Expert]
  cls_expert: Expert | None
  cells: Cells
  batch: int
  seed: int
  log: Callable[[str], None]
  baselines: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # row → label
  # reproduce's estimate: (cell, work units = records × new tokens, seconds or None if cached)
  progress: Callable[[str, int, float | None], None] = lambda what, units, seconds: None


def _cell(ctx: Context, table: str, row: str, suite: Suite, parts: dict,
          compute: Callable[[], dict]) -> dict:
  key = Cells.key({"suite": suite.settings, **parts})
  cell = ctx.cells.get(table, row, suite.label, key)
  fresh = cell is None
  if fresh:
    t0 = time.perf_counter()
    cell = ctx.cells.put(table, row, suite.label, key, {**compute(),
                                                        "seconds": time.perf_counter() - t0})
    ctx.log(f"{table} {row} on {suite.label} ({suite.task_name}): "
            f"{100 * np.mean(cell['outcomes']):.1f} % of {len(cell['outcomes'])} "
            f"({cell['seconds']:.0f} s)")
  ctx.progress(f"{table}/{row}/{suite.label}", len(suite.records) * suite.max_new_tokens,
               cell["seconds"] if fresh else None)
  return cell


def single_cell(ctx: Context, table: str, row: str, suite: Suite, e) -> dict:
  """Greedy outcomes of one model (base or one expert) on every record of the suite."""
  def compute():
    texts = generate_rows(ctx.model, suite, e, ctx.batch)
    return {"outcomes": suite.outcomes(texts).tolist(), "texts": texts}
  return _cell(ctx, table, row, suite, {"row": "single", "expert": expert_id(e)}, compute)


def own_task_table(ctx: Context, suites: Sequence[Suite]) -> dict:
  """Table 1: each expert vs base on the test split of its own training task, and every
  baseline row (config.baselines, e.g. LoRA) vs base and vs the expert, with the parameters
  each trained."""
  out = {"labels": [s.label for s in suites], "tasks": {s.label: s.task_name for s in suites},
         "rows": {"base": {}, "expert": {}}, "diff": {}, "paired": {}, "params": {"expert": {}}}
  for s in suites:
    base = single_cell(ctx, "own", "base", s, None)
    own = single_cell(ctx, "own", f"expert:{s.label}", s, ctx.experts[s.label])
    out["rows"]["base"][s.label] = interval(base["outcomes"], ctx.seed)
    out["rows"]["expert"][s.label] = interval(own["outcomes"], ctx.seed)
    out["diff"][s.label] = paired(own["outcomes"], base["outcomes"], ctx.seed)
    out["params"]["expert"][s.label] = num_params(ctx.experts[s.label])
    for row, by_label in ctx.baselines.items():
      if s.label not in by_label:
        continue
      e = by_label[s.label]
      cell = single_cell(ctx, "own", f"{row}:{s.label}", s, e)
      out["rows"].setdefault(row, {})[s.label] = interval(cell["outcomes"], ctx.seed)
      out["params"].setdefault(row, {})[s.label] = num_params(e)
      for name, other in (("base", base), ("expert", own)):
        out["paired"].setdefault(f"{row} − {name}", {})[s.label] = paired(
            cell["outcomes"], other["outcomes"], ctx.seed)
  return out


def search_units(fs, max_new_tokens: int) -> int:
  """Work units (rows × new tokens) of a few-shot search, for reproduce's estimate: per
  iteration the population generates on every shot, or with objective "loglik" the mean and
  the best do (each candidate's log p(reference) counted as one unit per shot)."""
  population, shots = int(fs.population), int(fs.shots)
  if fs.objective == "loglik":
    return int(fs.iterations) * shots * (2 * max_new_tokens + population)
  return int(fs.iterations) * population * shots * max_new_tokens


def _few_shot(ctx: Context, suite: Suite, fs, workdir: str) -> tuple[dict, dict]:
  """CEM over α on shots of the suite's task (train/val, never test), then the suite scored
  with the mixture found. The search is saved (few_shot_alpha_<label>.json, its history
  plot) and reused on a rerun when its settings match."""
  order = list(ctx.experts)
  settings = {k: fs[k] for k in ("shots", "split", "population", "elites", "iterations",
                                 "init_std", "per_matrix", "objective")}
  key = Cells.key({"suite": suite.settings, "experts": [expert_id(ctx.experts[n]) for n in order],
                   "few_shot": settings, "seed": ctx.seed})
  path = os.path.join(workdir, f"few_shot_alpha_{suite.label}.json")
  search = ctx.cells.get("target", "few_shot_search", suite.label, key)
  if search is not None:
    search["reused"] = True
  else:
    shots = adapt.few_shot_records(suite.task, int(fs.shots), fs.split, seed=ctx.seed)
    t0 = time.perf_counter()
    found = adapt.few_shot_cem(
        ctx.model, [ctx.experts[n] for n in order],
        encode_chats(ctx.model.tokenizer, [suite.task.messages(r) for r in shots]), shots,
        suite.task, max_new_tokens=suite.max_new_tokens, population=int(fs.population),
        elites=int(fs.elites), iterations=int(fs.iterations), init_std=float(fs.init_std),
        per_matrix=bool(fs.per_matrix), seed=ctx.seed, objective=fs.objective,
        loglik_batch_size=int(fs.loglik_batch_size))
    adapt.save_alpha(path, found, order)
    search = ctx.cells.put("target", "few_shot_search", suite.label, key, {
        "alpha": np.asarray(found.alpha).tolist(), "matrices": list(found.matrices),
        "best_score": found.best_score, "history": found.history, "experts": order,
        "seconds": time.perf_counter() - t0})
    ctx.log(f"few_shot search on {suite.label}: best {found.best_score:.3f} on the shots, "
            f"α {np.round(found.alpha, 3).tolist()} ({search['seconds']:.0f} s)")
  ctx.progress(f"target/few_shot_search/{suite.label}", search_units(fs, suite.max_new_tokens),
               None if search.get("reused") else search["seconds"])
  adapt.plot_history(os.path.join(workdir, f"few_shot_history_{suite.label}.png"),
                     search["history"])
  alpha, matrices = np.asarray(search["alpha"]), tuple(search["matrices"])

  def compute():
    texts, _, timing = two_pass_rows(ctx.model, suite, ctx.experts, ctx.batch,
                                     strategy="few_shot", alpha=alpha, matrices=matrices)
    return {"outcomes": suite.outcomes(texts).tolist(), "texts": texts, "timing": timing}
  cell = _cell(ctx, "target", "few_shot", suite, {"row": "few_shot", "search": key}, compute)
  return cell, search


def target_table(ctx: Context, suites: Sequence[Suite], strategies: Sequence[str], cfg,
                 workdir: str) -> dict:
  """Table 2: every row on every target task, dispatch accuracy, pass times, the few-shot
  searches and paired differences (each strategy vs base, few_shot vs the best single
  expert)."""
  labels = list(ctx.experts) + [OTHER]
  rows: dict[str, dict[str, dict]] = {}
  outcomes: dict[str, dict[str, list]] = {}
  timing: dict[str, dict] = {}
  dispatch: dict[str, dict] = {}
  searches: dict[str, dict] = {}

  def keep(row, suite, cell):
    outcomes.setdefault(row, {})[suite.label] = cell["outcomes"]
    rows.setdefault(row, {})[suite.label] = interval(cell["outcomes"], ctx.seed)

  if "base" in strategies:
    for s in suites:
      keep("base", s, single_cell(ctx, "target", "base", s, None))
  if "experts" in strategies:
    for label, e in ctx.experts.items():
      for s in suites:
        keep(f"expert:{label}", s, single_cell(ctx, "target", f"expert:{label}", s, e))
  for row, by_label in ctx.baselines.items():  # each on the task of its label only
    for s in suites:
      if s.label in by_label:
        keep(row, s, single_cell(ctx, "target", f"{row}:{s.label}", s, by_label[s.label]))
  pass1 = {"threshold": float(cfg.threshold), "calibrated": bool(cfg.calibrated),
           "prompt_style": cfg.dispatch_prompt}
  for strategy in ("prompt", "cls_expert"):
    if strategy not in strategies:
      continue
    chosen = {}
    for s in suites:
      def compute(s=s, strategy=strategy):
        texts, weights, t = two_pass_rows(ctx.model, s, ctx.experts, ctx.batch,
                                          strategy=strategy, cls_expert=ctx.cls_expert, **pass1)
        return {"outcomes": s.outcomes(texts).tolist(), "texts": texts, "weights": weights,
                "timing": t}
      parts = {"row": strategy, **pass1,
               "experts": {n: expert_id(e) for n, e in ctx.experts.items()},
               "cls": expert_id(ctx.cls_expert) if strategy == "cls_expert" else None}
      cell = _cell(ctx, "target", strategy, s, parts, compute)
      keep(strategy, s, cell)
      chosen[s.label] = [chosen_label(w) for w in cell["weights"]]
      timing.setdefault(strategy, {})[s.label] = cell["timing"]
    dispatch[strategy] = dispatch_summary(chosen, labels)
  if "few_shot" in strategies:
    for s in suites:
      cell, searches[s.label] = _few_shot(ctx, s, cfg.few_shot, workdir)
      keep("few_shot", s, cell)
      timing.setdefault("few_shot", {})[s.label] = {**cell["timing"],
                                                    "search_s": searches[s.label]["seconds"]}
  if "prompt" in strategies:
    timing["warm_prompt"] = {s.label: warm_timing(ctx, s, pass1) for s in suites}
  return {"labels": [s.label for s in suites], "tasks": {s.label: s.task_name for s in suites},
          "eval_size": {s.label: len(s.records) for s in suites}, "rows": rows,
          "paired": _comparisons(outcomes, suites, ctx.seed), "dispatch": dispatch,
          "timing": timing, "few_shot": searches,
          "params": {**{f"expert:{n}": num_params(e) for n, e in ctx.experts.items()},
                     **{f"{row}:{lab}": num_params(e) for row, by_label in ctx.baselines.items()
                        for lab, e in by_label.items()}}}


def warm_units(batch: int, suite: Suite) -> int:
  """Work units of warm_timing: the first batch, generated twice."""
  return 2 * min(batch, len(suite.records)) * suite.max_new_tokens


def warm_timing(ctx: Context, suite: Suite, pass1: dict) -> dict:
  """Pass 1 vs pass 2 of the prompt strategy with warm compiles, on the suite's first batch:
  run once to compile, then timed. Kept as a cell like the scores (a resumed run may not have
  compiled anything yet, so it times its own second call)."""
  head = dataclasses.replace(suite, records=suite.records[:ctx.batch])
  parts = {"row": "warm_prompt", **pass1,
           "experts": {n: expert_id(e) for n, e in ctx.experts.items()}}
  key = Cells.key({"suite": suite.settings, **parts})
  cell = ctx.cells.get("target", "warm_prompt", suite.label, key)
  fresh = cell is None
  if fresh:
    t0 = time.perf_counter()
    for _ in range(2):
      texts, _, t = two_pass_rows(ctx.model, head, ctx.experts, ctx.batch, strategy="prompt",
                                  **pass1)
    cell = ctx.cells.put("target", "warm_prompt", suite.label, key, {
        **t, "pass1_fraction": t["pass1_s"] / t["pass2_s"], "rows": len(texts),
        "seconds": time.perf_counter() - t0})
  ctx.progress(f"target/warm_prompt/{suite.label}", warm_units(ctx.batch, suite),
               cell["seconds"] if fresh else None)
  return {k: cell[k] for k in ("pass1_s", "pass2_s", "pass1_fraction", "rows")}


def _comparisons(outcomes: dict[str, dict[str, list]], suites: Sequence[Suite],
                 seed: int) -> dict[str, dict[str, dict]]:
  """Paired differences on each task: every strategy vs base, and few_shot vs the single
  expert that scored best on that task's test records (chosen after the fact, so this
  favours the expert)."""
  out: dict[str, dict[str, dict]] = {}
  singles = [r for r in outcomes if r.startswith("expert:")]
  for s in suites:
    lab = s.label
    if "base" in outcomes:
      for row in outcomes:
        if row != "base" and lab in outcomes[row]:  # a baseline row has its own task only
          out.setdefault(f"{row} − base", {})[lab] = paired(outcomes[row][lab],
                                                            outcomes["base"][lab], seed)
    if singles:
      best = max(singles, key=lambda r: np.mean(outcomes[r][lab]))
      for row in ("few_shot", "prompt", "cls_expert"):
        if row in outcomes:
          d = paired(outcomes[row][lab], outcomes[best][lab], seed)
          out.setdefault(f"{row} − best single expert", {})[lab] = {**d, "expert": best}
  return out


def paired_markdown(paired_rows: dict[str, dict[str, dict]], labels: Sequence[str]) -> str:
  lines = ["| paired difference (points) | " + " | ".join(labels) + " |",
           "|" + "---|" * (len(labels) + 1)]
  for name, cells in paired_rows.items():
    lines.append(f"| {name} | " + " | ".join(
        diff_text(cells[lab]) + (f" vs {cells[lab]['expert']}" if "expert" in cells[lab] else "")
        if lab in cells else "–" for lab in labels) + " |")
  return "\n".join(lines)


def report(result: dict) -> str:
  """results.md: the tables, dispatch and timing as markdown."""
  parts = []
  own = result.get("own")
  if own:
    heads = [f"{lab} ({own['tasks'][lab]})" for lab in own["labels"]]
    parts += ["## Table 1: each expert vs base on its own task (test split, 95 % intervals)", "",
              markdown_table(own["rows"], own["labels"], heads), "",
              paired_markdown({"expert − base": own["diff"], **own.get("paired", {})},
                              own["labels"]), ""]
    for row, by_label in own.get("params", {}).items():
      parts.append(f"- parameters trained, {row}: " + ", ".join(
          f"{lab} {n:,}" for lab, n in by_label.items()))
    parts.append("")
  target = result["target"]
  heads = [f"{lab} ({target['tasks'][lab]})" for lab in target["labels"]]
  parts += ["## Table 2: target tasks (95 % intervals)", "",
            markdown_table(target["rows"], target["labels"], heads), "",
            paired_markdown(target["paired"], target["labels"]), ""]
  if target.get("params"):
    parts.append("- parameters trained: " + ", ".join(
        f"{row} {n:,}" for row, n in target["params"].items()))
  for strategy, d in target["dispatch"].items():
    parts.append(f"- dispatch {strategy}: {100 * d['accuracy']:.1f} % right; confusion "
                 f"{json.dumps(d['confusion'])}")
  for lab, t in target["timing"].get("warm_prompt", {}).items():
    parts.append(f"- warm prompt strategy on {lab}: pass 1 {t['pass1_s']:.2f} s, pass 2 "
                 f"{t['pass2_s']:.2f} s ({100 * t['pass1_fraction']:.1f} % of pass 2)")
  for lab, search in target["few_shot"].items():
    h = search["history"]
    first, last = h[0], h[-1]
    by_loglik = adapt.ranked_by_loglik(h)
    score = "mean log p(reference)" if by_loglik else "score"
    line = (f"- few_shot on {lab}: α {np.round(search['alpha'], 3).tolist()}; on the shots, "
            f"first → last of {len(h)} iterations: {score} at the mean "
            f"{first['score_at_mean']:.3f} → {last['score_at_mean']:.3f}, best candidate "
            f"{first['score_best']:.3f} → {last['score_best']:.3f}")
    if by_loglik:
      line += (f"; accuracy at the mean {first['accuracy_at_mean']:.3f} → "
               f"{last['accuracy_at_mean']:.3f}, of the best {first['accuracy_best']:.3f} → "
               f"{last['accuracy_best']:.3f}")
    elif first.get("loglik_at_mean") is not None and last.get("loglik_at_mean") is not None:
      line += (f", mean log-likelihood of the references at the mean "
               f"{first['loglik_at_mean']:.3f} → {last['loglik_at_mean']:.3f}")
    parts.append(line)
  return "\n".join(parts) + "\n"


def setup(cfg, workdir: str, log: Callable[[str], None]) -> tuple[Context, list[str]]:
  """Loads the model and experts named by an adaptation config; checks the strategies."""
  import t2jax  # pylint: disable=import-outside-toplevel

  strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
  unknown = sorted(set(strategies) - set(KNOWN_STRATEGIES))
  if unknown:
    raise ValueError(f"config.strategies has {unknown}; use some of {KNOWN_STRATEGIES}.")
  if cfg.dispatch_prompt not in PROMPT_STYLES:
    raise ValueError(f"config.dispatch_prompt {cfg.dispatch_prompt!r} is unknown; use one of "
                     f"{PROMPT_STYLES}.")
  if "few_shot" in strategies and cfg.few_shot.objective not in adapt.CEM_OBJECTIVES:
    raise ValueError(f"config.few_shot.objective {cfg.few_shot.objective!r} is unknown; use "
                     f"one of {adapt.CEM_OBJECTIVES}.")
  if "cls_expert" in strategies and not cfg.cls_expert:
    strategies.remove("cls_expert")  # nothing to score it with: the row is left out
  paths = parse_experts(cfg.experts)
  os.makedirs(workdir, exist_ok=True)
  model = t2jax.load_model(cfg.model or None, dtype=cfg.dtype)
  experts = {label: load_expert(label, p, model) for label, p in paths.items()}
  cls_expert = load_expert("cls", cfg.cls_expert, model) if cfg.cls_expert else None
  baselines = {row: {label: load_expert(f"{row}:{label}", p, model, svf_only=False)
                     for label, p in by_label.items()}
               for row, by_label in parse_baselines(cfg.get("baselines", ""), list(paths)).items()}
  ctx = Context(model, experts, cls_expert, Cells(workdir, log), int(cfg.eval_batch_size),
                int(cfg.seed), log, baselines=baselines)
  return ctx, strategies


def check_can_score(suites: Sequence[Suite]) -> None:
  """Refuses at the start, in one line, when a code suite's programs could not run (no
  usable sandbox): otherwise every code cell would score 0 after hours of generation."""
  from t2jax.tasks import sandbox  # pylint: disable=import-outside-toplevel

  for s in suites:
    if not hasattr(s.task, "program"):
      continue
    unsafe = bool(getattr(s.task, "unsafe_sandbox", False))
    try:
      r = sandbox.run("print(6 * 7)", timeout_s=30.0, unsafe=unsafe)
    except sandbox.SandboxUnavailable as e:
      raise ValueError(f"task {s.task_name!r} scores programs, but {e}") from None
    if r.returncode != 0 or r.stdout.strip() != "42":
      why = (r.stderr.strip().splitlines() or ["no output"])[-1]
      raise ValueError(f"task {s.task_name!r} scores programs, but the code sandbox cannot run "
                       f"Python here ({why}); fix it (python -m pytest tests/test_sandbox.py) "
                       "before evaluating.")


def target_suites(cfg) -> list[Suite]:
  suites = []
  for label, task in parse_tasks(cfg.tasks).items():
    if label not in cfg.max_new_tokens:
      raise ValueError(f"config.max_new_tokens has no entry for task label {label!r}.")
    args = cfg.task_args[label].to_dict() if label in cfg.task_args else {}
    suites.append(make_suite(label, task, args, int(cfg.eval_size), cfg.max_new_tokens[label]))
  return suites


def write(workdir: str, result: dict, log: Callable[[str], None]) -> None:
  """results.json, results.md and results.png (one chart per table)."""
  md = report(result)
  atomic.write_text(os.path.join(workdir, "results.json"), json.dumps(result, indent=1))
  atomic.write_text(os.path.join(workdir, "results.md"), md)
  target = result["target"]
  plotted = plot(os.path.join(workdir, "results.png"), target["rows"], target["labels"],
                 "target tasks")
  if result.get("own"):
    plot(os.path.join(workdir, "results_own.png"), result["own"]["rows"],
         result["own"]["labels"], "own tasks")
  print(md)
  log(f"wrote {os.path.join(workdir, 'results.json')}, results.md"
      + (" and results.png" if plotted else " (no matplotlib: no chart)"))


def run(cfg, workdir: str, own_suites: Sequence[Suite] = (), *, ctx: Context | None = None,
        log: Callable[[str], None] | None = None) -> dict:
  log = log or (lambda msg: print(f"[adapt {time.strftime('%H:%M:%S')}] {msg}", flush=True))
  if ctx is None:
    ctx, strategies = setup(cfg, workdir, log)
  else:
    strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
  suites = target_suites(cfg)
  check_can_score([*own_suites, *suites])
  result = {"own": own_task_table(ctx, own_suites) if own_suites else None,
            "target": target_table(ctx, suites, strategies, cfg, workdir),
            "experts": parse_experts(cfg.experts), "cls_expert": cfg.cls_expert or None,
            "config": cfg.to_dict()}
  write(workdir, result, log)
  return result
