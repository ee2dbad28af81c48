"""Training progress reporting: progress bar, WORKDIR/metrics.jsonl, TensorBoard, plots, tables."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterator

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from t2jax import atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_RESERVED = ("step", "kind", "split", "time")
# JSON has no NaN or infinity: NaN is written as null, infinities as these strings.
_INF = {"inf": math.inf, "-inf": -math.inf}


def _scalar(name: str, value: Any) -> int | float:
  """A plain Python int/float from a Python, numpy or jax scalar (bools become ints)."""
  if isinstance(value, bool):
    return int(value)
  if type(value) in (int, float):  # np.float64 subclasses float but is not plain
    return value
  arr = np.asarray(value)  # also pulls a jax scalar to the host
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise TypeError(f"metric {name!r} must be a numeric scalar, got {type(value).__name__} "
                    f"with shape {arr.shape} and dtype {arr.dtype}")
  item = arr.reshape(()).item()
  return int(item) if isinstance(item, bool) else item


def _encode(value: int | float) -> int | float | str | None:
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def _decode(record: dict) -> dict:
  out = {}
  for key, value in record.items():
    if value is None:
      value = math.nan
    elif key not in ("kind", "split") and isinstance(value, str) and value in _INF:
      value = _INF[value]
    out[key] = value
  return out


def _line(record: dict[str, Any]) -> str:
  return json.dumps(record, allow_nan=False) + "\n"


def _iter_lines(path: str) -> Iterator[tuple[int, str, dict | None]]:
  """(line number, raw line, parsed dict or None when malformed) for each non-blank line."""
  with open(path, encoding="utf-8") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except json.JSONDecodeError:
        record = None
      yield lineno, raw, record if isinstance(record, dict) else None


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, NaN (stored as null) and infinities restored."""
  records = []
  for lineno, raw, record in _iter_lines(path):
    if record is None:
      raise ValueError(f"{path}:{lineno}: not a JSON object: {raw.strip()[:80]!r}")
    records.append(_decode(record))
  return records


def _truncate_after(path: str, start_step: int) -> None:
  """Drops records of steps > start_step: they are re-run after restoring checkpoint start_step."""
  kept, dropped = [], False
  lines = list(_iter_lines(path))
  for i, (lineno, raw, record) in enumerate(lines):
    if record is None:
      # A run killed mid-write leaves a partial last line; anything else is real damage.
      if i == len(lines) - 1 and not raw.endswith("\n"):
        dropped = True
        continue
      raise ValueError(f"{path}:{lineno}: not a JSON object: {raw.strip()[:80]!r}")
    if not isinstance(record.get("step"), int):
      raise ValueError(f"{path}:{lineno}: record has no integer 'step'")
    if record["step"] > start_step:
      dropped = True
    else:
      kept.append(raw if raw.endswith("\n") else raw + "\n")
  if dropped:
    atomic.write_text(path, "".join(kept))


class RunLog:
  """Progress bar + WORKDIR/metrics.jsonl + TensorBoard events for one training run."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               enabled: bool = True, progress: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._closed = False
    self._postfix: dict[str, str] = {}
    if not enabled:  # non-zero processes of a multi-host run stay silent
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      if start_step > 0:
        _truncate_after(self.path, start_step)
      else:
        atomic.write_text(self.path, "")
    self._file = open(self.path, "a", encoding="utf-8")
    # purge_step hides events a crashed run wrote past the checkpoint we resume from.
    self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), flush_secs=30,
                             purge_step=start_step + 1 if start_step > 0 else None)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                          dynamic_ncols=True, disable=not progress)

  def _write(self, record: dict[str, Any]) -> None:
    self._file.write(_line(record))
    self._file.flush()  # a crash loses at most the line being written

  def _check(self, metrics: dict[str, Any]) -> dict[str, int | float]:
    if self._closed:
      raise RuntimeError(f"RunLog for {self.path} is already closed")
    clash = sorted(set(metrics) & set(_RESERVED))
    if clash:
      raise ValueError(f"metric names {clash} are reserved in {METRICS_FILE}")
    return {name: _scalar(name, value) for name, value in metrics.items()}

  def log_step(self, step: int, metrics: dict[str, float]) -> None:
    """One "train" record for `step`; advances the progress bar to `step`."""
    if not self.enabled:
      return
    values = self._check(metrics)
    step = int(step)
    self._write({"step": step, "kind": "train", **{k: _encode(v) for k, v in values.items()},
                 "time": time.time()})
    for name, value in values.items():
      self._tb.add_scalar(f"train/{name}", value, step)
    for key, label, fmt in (("reward", "reward", "{:.3f}"), ("kl", "kl", "{:.2e}"),
                            ("tokens_per_s", "tok/s", "{:.0f}")):
      if key in values:
        self._postfix[label] = fmt.format(values[key])
    self._bar.set_postfix(self._ordered_postfix(), refresh=False)
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def log_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
    """One "eval" record of `split` at `step`; the "val" accuracy goes to the progress bar."""
    if not self.enabled:
      return
    values = self._check(metrics)
    step = int(step)
    self._write({"step": step, "kind": "eval", "split": split,
                 **{k: _encode(v) for k, v in values.items()}})
    for name, value in values.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    if split == "val" and "accuracy" in values:
      self._postfix["val_acc"] = f"{100 * values['accuracy']:.1f}%"
      self._bar.set_postfix(self._ordered_postfix())

  def _ordered_postfix(self) -> dict[str, str]:
    order = ("reward", "val_acc", "kl", "tok/s")
    return {k: self._postfix[k] for k in order if k in self._postfix}

  def close(self) -> None:
    if not self.enabled or self._closed:
      return
    self._closed = True
    self._bar.close()
    self._tb.close()  # flushes pending events
    self._file.close()

  def __enter__(self) -> RunLog:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over the last `window` points (fewer at the start)."""
  csum = np.cumsum(np.insert(y, 0, 0.0))
  idx = np.arange(1, len(y) + 1)
  lo = np.maximum(idx - window, 0)
  return (csum[idx] - csum[lo]) / (idx - lo)


def plot(metrics_path: str, out_png: str, *, baselines: dict[str, float] | None = None) -> str:
  """Writes a PNG of train reward and val accuracy over steps; returns `out_png`."""
  # Imported here so the trainer does not pay matplotlib's import time unless it plots; the
  # Agg canvas is attached directly, so no pyplot and no global backend switch.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import PercentFormatter  # pylint: disable=import-outside-toplevel

  records = read_metrics(metrics_path)
  train = [(r["step"], r["reward"]) for r in records
           if r.get("kind") == "train" and isinstance(r.get("reward"), (int, float))
           and math.isfinite(r["reward"])]
  evals = [(r["step"], r["accuracy"]) for r in records
           if r.get("kind") == "eval" and r.get("split") == "val"
           and isinstance(r.get("accuracy"), (int, float)) and math.isfinite(r["accuracy"])]

  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_r, ax_a = fig.subplots(1, 2)

  ax_r.set(title="train reward", xlabel="step", ylabel="reward")
  if train:
    steps, reward = (np.asarray(v, dtype=np.float64) for v in zip(*sorted(train)))
    window = max(1, len(reward) // 20)
    ax_r.plot(steps, reward, ".", color="tab:blue", alpha=0.3, markersize=3, label="per step")
    ax_r.plot(steps, _moving_average(reward, window), color="tab:blue",
              label=f"moving average ({window})")
    ax_r.legend(loc="best")
  else:
    ax_r.text(0.5, 0.5, "no train steps yet", ha="center", va="center", transform=ax_r.transAxes)

  ax_a.set(title="val accuracy", xlabel="step", ylabel="accuracy")
  ax_a.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
  if evals:
    steps, acc = zip(*sorted(evals))
    ax_a.plot(steps, acc, "o-", color="tab:green", label="val accuracy")
  else:
    ax_a.text(0.5, 0.5, "no val evaluations yet", ha="center", va="center",
              transform=ax_a.transAxes)
  for i, (label, value) in enumerate((baselines or {}).items()):
    ax_a.axhline(value, linestyle="--", color=f"C{(i + 3) % 10}", label=label)
  if evals or baselines:
    ax_a.legend(loc="best")

  atomic.write_file(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  return out_png


def summary_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
  """Aligned plain-text table of accuracies as percentages; a missing value shows as "-"."""
  def cell(value: float | None) -> str:
    if value is None:
      return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{100 * value:.1f}%"

  table = [[""] + list(columns)]
  table += [[name] + [cell(values.get(c)) for c in columns] for name, values in rows.items()]
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  lines = []
  for row in table:
    # Names left-aligned, numbers right-aligned so decimal points line up.
    parts = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
    lines.append("  ".join(parts).rstrip())
  return "\n".join(lines)
