"""RunLog files (jsonl, resume, TensorBoard), read_metrics, plot and summary_table."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from t2jax import reporting
from t2jax.reporting import RunLog, plot, read_metrics, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _log(workdir, steps, start_step=0, total=10, evals=()):
  with RunLog(str(workdir), total_steps=total, start_step=start_step, progress=False) as log:
    for step in steps:
      log.log_step(step, {"reward": 0.1 * step, "kl": 1e-3, "tokens_per_s": 500.0})
      if step in evals:
        log.log_eval(step, "val", {"accuracy": 0.05 * step})


def _train_steps(workdir):
  return [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if r["kind"] == "train"]


def _tb_scalars(workdir):
  """{tag: [(step, value)]} read straight from the TFRecord framing of the event files."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, payload, payload crc
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_one_line_per_step_and_eval_lines(tmp_path):
  _log(tmp_path, range(1, 5), evals=(2, 4))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["kind"]) for r in records] == [
      (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
  train = records[0]
  assert set(train) == {"step", "kind", "reward", "kl", "tokens_per_s", "time"}
  assert train["reward"] == pytest.approx(0.1) and isinstance(train["time"], float)
  assert records[2] == {"step": 2, "kind": "eval", "split": "val", "accuracy": pytest.approx(0.1)}


def test_numpy_scalars_become_plain_numbers(tmp_path):
  with RunLog(str(tmp_path), total_steps=3, progress=False) as log:
    log.log_step(1, {"reward": np.float32(0.5), "n": np.int64(7), "ok": np.bool_(True),
                     "arr": np.array(2.0)})
  line = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert (line["reward"], line["n"], line["ok"], line["arr"]) == (0.5, 7, 1, 2.0)
  assert isinstance(line["n"], int)


def test_bad_metrics_raise(tmp_path):
  with RunLog(str(tmp_path), total_steps=3, progress=False) as log:
    with pytest.raises(ValueError, match="reserved"):
      log.log_step(1, {"step": 1.0})
    with pytest.raises(TypeError, match="vec"):
      log.log_step(1, {"vec": np.zeros(3)})


def test_resume_truncates_to_start_step(tmp_path):
  _log(tmp_path, range(1, 6), evals=(2, 4))
  _log(tmp_path, range(4, 7), start_step=3, evals=(6,))
  assert _train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
  evals = [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))
           if r["kind"] == "eval"]
  assert evals == [2, 6]  # the eval at step 4 belonged to the dropped run
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_resume_drops_partial_last_line(tmp_path):
  _log(tmp_path, range(1, 4))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "ki')  # killed mid-write
  _log(tmp_path, [4], start_step=3)
  assert _train_steps(tmp_path) == [1, 2, 3, 4]


def test_fresh_start_replaces_old_file(tmp_path):
  _log(tmp_path, range(1, 6))
  _log(tmp_path, range(1, 3))
  assert _train_steps(tmp_path) == [1, 2]


def test_nan_and_inf_round_trip(tmp_path):
  with RunLog(str(tmp_path), total_steps=3, progress=False) as log:
    log.log_step(1, {"reward": float("nan"), "kl": np.float32("inf")})
    log.log_eval(1, "val", {"accuracy": np.nan})
  text = (tmp_path / "metrics.jsonl").read_text()
  for line in text.splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  train, ev = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert math.isnan(train["reward"]) and train["kl"] == math.inf
  assert math.isnan(ev["accuracy"]) and ev["split"] == "val"


def test_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with RunLog(str(workdir), total_steps=3, enabled=False) as log:
    log.log_step(1, {"reward": 1.0})
    log.log_eval(1, "val", {"accuracy": 1.0})
  assert not workdir.exists()


def test_tensorboard_scalars(tmp_path):
  _log(tmp_path, range(1, 4), evals=(3,))
  scalars = _tb_scalars(str(tmp_path))
  assert [s for s, _ in scalars["train/reward"]] == [1, 2, 3]
  assert scalars["train/reward"][-1][1] == pytest.approx(0.3)
  assert scalars["val/accuracy"] == [(3, pytest.approx(0.15))]


def test_progress_bar_postfix(tmp_path, capsys):
  with RunLog(str(tmp_path), total_steps=10, start_step=2, progress=True) as log:
    assert log._bar.n == 2
    log.log_step(3, {"reward": 0.25, "kl": 0.002, "tokens_per_s": 1234.0})
    log.log_eval(3, "val", {"accuracy": 0.4})
    log.log_eval(3, "test", {"accuracy": 0.9})  # not shown: only val goes to the bar
    assert log._bar.n == 3
    postfix = log._bar.postfix
  assert postfix == "reward=0.250, val_acc=40.0%, kl=2.00e-03, tok/s=1234"
  assert "3/10" in capsys.readouterr().err


def test_read_metrics_names_bad_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "kind": "train"}\nnot json\n')
  with pytest.raises(ValueError, match=f"{path}:2"):
    read_metrics(str(path))


@pytest.mark.parametrize("evals", [(), (2, 4)])
def test_plot_writes_png(tmp_path, evals):
  _log(tmp_path, range(1, 6), evals=evals)
  out = str(tmp_path / "plots" / "progress.png")
  assert plot(str(tmp_path / "metrics.jsonl"), out, baselines={"base val accuracy": 0.31}) == out
  with open(out, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  assert os.listdir(tmp_path / "plots") == ["progress.png"]


def test_moving_average():
  np.testing.assert_allclose(reporting._moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2),
                             [1.0, 2.0, 4.0, 6.0])


def test_summary_table():
  table = summary_table({"base": {"val": 0.31, "test": 0.29},
                         "expert (math)": {"val": 0.4567}}, ["val", "test"])
  assert table.splitlines() == [
      "                 val   test",
      "base           31.0%  29.0%",
      "expert (math)  45.7%      -",
  ]


def test_ci_fails_skipped_tests(tmp_path):
  """Under CI=true a skipped test fails the run (CI installs every tool); elsewhere a skip is a
  skip."""
  (tmp_path / "test_one.py").write_text(
      "import pytest\n\n@pytest.mark.skipif(True, reason='no tool')\ndef test_a():\n  pass\n\n"
      "def test_b():\n  pytest.skip('missing thing')\n\n"
      "@pytest.mark.xfail(reason='known')\ndef test_c():\n  assert False\n")
  tests_dir = os.path.dirname(os.path.abspath(__file__))

  def run(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci, "PYTHONPATH": tests_dir}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p",
                           "no:cacheprovider", str(tmp_path)], env=env, capture_output=True,
                          text=True, cwd=tmp_path, check=False)

  ci = run("true")
  assert ci.returncode == 1, ci.stdout
  # a skipif mark skips in setup (reported as an error), pytest.skip in the call (a failure)
  assert "1 failed, 1 xfailed, 1 error" in ci.stdout, ci.stdout
  assert "skipped under CI=true (Skipped: no tool)" in ci.stdout
  assert "skipped under CI=true (Skipped: missing thing)" in ci.stdout
  local = run("")
  assert local.returncode == 0 and "2 skipped, 1 xfailed" in local.stdout, local.stdout
