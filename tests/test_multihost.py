"""Multi-host runs as local processes (launch/local_multiprocess.sh, gloo collectives): two
processes take the SGD step of one and train to the z of one, through a checkpoint save and
restore; a process that dies stops the others instead of leaving them hanging."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

import modulo_task
import sgd_step_child
import t2jax
from t2jax import tasks
from t2jax.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
# 4 prompts (8 rollouts) and 4 eval rows a batch: splits over 4 devices; val scored every step,
# so the best-val expert and the scores go through process 0's files too. The modulo task
# (tests/modulo_task.py): rows differ in reward and accuracy even for a random model, so the
# summaries compare accuracies that are neither 0 nor 1.
OVERRIDES = dict(batch_size=4, checkpoint_every=1, eval_batch_size=4, eval_every=1)
TRAIN = ["-m", "t2jax.train"]


def _config_file(tmp_path, model_dir: str) -> str:
  """A config file for `python -m t2jax.train --config`: the tiny test config on the modulo
  task, registered in each process as the config loads."""
  path = tmp_path / "tiny.py"
  path.write_text(
      "import modulo_task\n\n\n"
      "def get_config():\n  modulo_task.register()\n"
      f"  return modulo_task.tiny_modulo_config({model_dir!r}, **OVERRIDES)\n\n\n"
      f"OVERRIDES = {OVERRIDES!r}\n")
  return str(path)


def _launch(n: int, devices: int, args: list[str], log: str, env=None) -> subprocess.Popen:
  """The launcher running `python ARGS` as n processes; output into `log` (a file, not a
  pipe: nobody reads a pipe while the test waits, and a full one blocks)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
         "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                        os.environ.get("PYTHONPATH", "")])}
  with open(log, "w") as f:
    return subprocess.Popen(
        [LAUNCH, str(n), "--devices", str(devices), "--", sys.executable, *args], env=env,
        stdout=f, stderr=subprocess.STDOUT, text=True)


def _run(n, devices, args, log, timeout=600) -> str:
  proc = _launch(n, devices, args, log)
  proc.wait(timeout=timeout)
  with open(log) as f:
    out = f.read()
  assert proc.returncode == 0, out[-4000:]
  return out


def _z(workdir: str) -> dict:
  return t2jax.Expert.load(os.path.join(workdir, "expert")).z


def test_two_processes_train_to_the_z_of_one_through_a_restore(chat_model_dir, tmp_path,
                                                              monkeypatch):
  config = _config_file(tmp_path, chat_model_dir)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # pylint: disable-next=protected-access
  monkeypatch.setitem(tasks._REGISTRY, "modulo", modulo_task.ENTRY)
  train(modulo_task.tiny_modulo_config(chat_model_dir, steps=2, **OVERRIDES), one,
        progress=False)
  # 2 processes × 2 CPU devices: the batch of 4 prompts (8 rollouts) is split 4 ways. Step 1,
  # stop (checkpoint), then a second launch restores it and runs step 2.
  common = [*TRAIN, "--config", config, "--workdir", two, "--config.mesh=data:-1"]
  _run(2, 2, common + ["--config.steps=1"], str(tmp_path / "first.log"))
  err = _run(2, 2, common + ["--config.steps=2"], str(tmp_path / "second.log"))
  assert "resuming" in err and "from step 1" in err
  assert re.search(r"\[1\] ", err)  # both processes ran
  z_one, z_two = _z(one), _z(two)
  assert z_one.keys() == z_two.keys()
  assert max(np.abs(v - 1.0).max() for v in z_one.values()) > 1e-4  # training moved z
  for k in z_one:
    np.testing.assert_allclose(z_two[k], z_one[k], atol=1e-5, err_msg=k)
  summaries = []
  for workdir in (one, two):
    with open(os.path.join(workdir, "summary.json")) as f:
      summaries.append(json.load(f))
  # each process scores its eval rows and the sums are shared: with some rows right and some
  # wrong, a row dropped, counted twice or scored in another's place moves a figure
  for split in ("val", "test"):
    assert 0 < summaries[0]["base"][split]["accuracy"] < 1, summaries[0]
  assert summaries[0] == summaries[1]


def test_two_processes_take_the_sgd_step_of_one(checkpoint, tmp_path):
  """One SGD step on data:-1 over 4 CPU devices held by 1 process, and by 2 processes of 2
  devices each passing their own rows (tests/sgd_step_child.py): the loss, gradient norm and
  z of the unsharded reference both times, so a gradient summed or scaled per process fails."""
  path, _ = checkpoint("llama")
  got = {}
  for n in (1, 2):
    out = _run(n, 4 // n, [sgd_step_child.__file__, path, "data:-1"],
               str(tmp_path / f"{n}.log"))
    got[n] = json.loads(re.search(r"^\[0\] (\{.*)$", out, re.M).group(1))
    sgd_step_child.assert_same_step(got[n]["data:-1"], got[n]["reference"])
  sgd_step_child.assert_same_step(got[2]["data:-1"], got[1]["data:-1"])


def test_a_dead_process_stops_the_others_within_60_s(chat_model_dir, tmp_path):
  config = _config_file(tmp_path, chat_model_dir)
  workdir = str(tmp_path / "run")
  # the launcher's own kill comes after 50 s: what is tested is that JAX stops the survivor
  log = str(tmp_path / "launch.log")
  proc = _launch(2, 1, [*TRAIN, "--config", config, "--workdir", workdir,
                        "--config.steps=100000", "--config.checkpoint_every=100000"], log,
                 env={"T2JAX_HEARTBEAT_S": "10", "T2JAX_GRACE_S": "50"})
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert proc.poll() is None, open(log).read()[-4000:]
    time.sleep(1)
  assert os.path.getsize(metrics), "training did not start"  # both processes are in the loop
  with open(log) as f:
    pid = int(re.search(r"local_multiprocess: process 1 pid (\d+)", f.read()).group(1))
  killed = time.time()
  os.kill(pid, signal.SIGKILL)
  proc.wait(timeout=120)
  took = time.time() - killed
  with open(log) as f:
    err = f.read()
  assert proc.returncode != 0
  assert took < 60, f"the other process took {took:.0f}s to stop"
  assert "process 1" in err and "exited with status" in err
  assert "another task died" in err  # JAX's own message from the survivor, not our kill
  assert "killing" not in err

