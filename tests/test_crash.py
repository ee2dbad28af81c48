"""Crashes and what they leave behind: a run SIGKILLed at several moments and started again
ends bitwise equal to an uninterrupted one; a checkpoint resumes on another process and device
layout; a damaged checkpoint, expert or SVD cache file is named, never trusted.

Runs that get killed are subprocesses (tests/crash_child.py, which installs the kill hooks);
they share a JAX compilation cache, so only the first of each layout pays the compiles.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import t2jax
from conftest import tiny_config
from crash_child import CONFIG
from t2jax import checkpoint, reporting, svf
from t2jax.train import train

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
# wall-clock fields of a metrics line: the only ones a resumed run may change
TIMING = ("rollout_s", "update_s", "tokens_per_s", "time")


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def straight(chat_model_dir, tmp_path_factory) -> str:
  """The workdir of the uninterrupted run, in this process on one device."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train(tiny_config(chat_model_dir, **CONFIG), workdir, progress=False)
  return workdir


def _child(env: dict, model_dir: str, workdir: str, *args: str, processes: int = 1,
           devices: int = 1) -> subprocess.CompletedProcess:
  """tests/crash_child.py with `args` (KEY=VALUE overrides, a WHERE:STEP kill) in fresh
  interpreters, `processes` of them through the launcher, with `devices` CPU devices each:
  nothing survives a kill but the workdir."""
  command = [sys.executable, os.path.join(TESTS, "crash_child.py"), model_dir, workdir, *args]
  if processes > 1:
    command = [LAUNCH, str(processes), "--devices", str(devices), "--", *command]
  elif devices > 1:
    env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


def _z(workdir: str) -> dict:
  return t2jax.Expert.load(os.path.join(workdir, "expert")).z


def _metrics(workdir: str) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in reporting.read_metrics(os.path.join(workdir, reporting.METRICS_FILE))]


def _checkpoints(workdir: str) -> checkpoint.Checkpoints:
  return checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"))


def _assert_same_run(a: str, b: str) -> None:
  """Bitwise: the exported z, the last checkpoint (z, optimizer state, step, rng, data
  iterator) and metrics.jsonl but for its wall-clock fields."""
  z_a, z_b = _z(a), _z(b)
  assert z_a.keys() == z_b.keys()
  for k in z_a:
    np.testing.assert_array_equal(z_a[k], z_b[k], err_msg=k)
  saved = []
  for workdir in (a, b):
    ckpt = _checkpoints(workdir)
    saved.append(ckpt.restore(ckpt.latest_step()))
    ckpt.close()
  (state_a, data_a), (state_b, data_b) = saved
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert data_a == data_b
  assert _metrics(a) == _metrics(b)


# (where:step the run is killed, the checkpoint it leaves as the latest); 6 steps, saved at 2,
# 4, 6. log:4 leaves half a metrics line, save:4 step 4's files half written.
KILLS = [("update:3", 2), ("log:4", 2), ("save:4", 2), ("rollout:5", 4)]


def test_a_run_killed_four_times_ends_bitwise_equal(chat_model_dir, straight, child_env,
                                                    tmp_path):
  killed = str(tmp_path / "killed")
  for kill, latest in KILLS:
    out = _child(child_env, chat_model_dir, killed, kill)
    assert out.returncode == -9, (kill, out.stderr[-4000:])  # SIGKILL
    assert _checkpoints(killed).latest_step() == latest, kill
    if kill.startswith("log"):
      with open(os.path.join(killed, reporting.METRICS_FILE)) as f:
        assert not f.read().endswith("\n"), "no half-written line"
    if kill.startswith("save"):
      assert glob.glob(os.path.join(killed, "checkpoints", "4.*")), "the save had finished"
  out = _child(child_env, chat_model_dir, killed)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "from step 4" in out.stderr
  _assert_same_run(straight, killed)
  assert [r["step"] for r in _metrics(killed)] == [1, 2, 3, 4, 5, 6]


# Greedy rollouts: a random model's next-token distribution is nearly uniform, so the rounding
# differences of another layout move some inverse-CDF draws to a neighbouring token; argmax
# does not move.
GREEDY = ("temperature=0.0", "samples_per_prompt=1")


def test_a_checkpoint_resumes_on_other_layouts(chat_model_dir, child_env, tmp_path):
  """Checkpointed at step 4 on 1 process × 4 devices, resumed on 2 processes × 2 devices and
  on 1 device: each ends within 1e-6 of the run that went on where it was checkpointed."""
  straight = str(tmp_path / "1x4")
  out = _child(child_env, chat_model_dir, straight, *GREEDY, devices=4)
  assert out.returncode == 0, out.stderr[-4000:]
  z_straight = _z(straight)
  for processes, devices in ((2, 2), (1, 1)):
    workdir = str(tmp_path / f"{processes}x{devices}")
    shutil.copytree(straight, workdir)
    for done in ("checkpoints/6", "expert"):  # back to the state after step 4
      shutil.rmtree(os.path.join(workdir, done))
    out = _child(child_env, chat_model_dir, workdir, *GREEDY, processes=processes,
                 devices=devices)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "from step 4" in out.stderr
    z = _z(workdir)
    for k in z_straight:
      np.testing.assert_allclose(z[k], z_straight[k], rtol=0, atol=1e-6, err_msg=k)


def _damage(path: str, how: str) -> None:
  if how == "truncated":
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "zeroed":
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.write(b"\0" * size)
  else:
    os.remove(path)


@pytest.mark.parametrize("part,how", [("meta/metadata", "truncated"),  # read by the config check
                                      ("state/d/*", "zeroed"),  # the arrays
                                      ("data/metadata", "deleted")])  # the data iterator
def test_an_unreadable_checkpoint_is_refused_naming_what_to_delete(chat_model_dir, straight,
                                                                    tmp_path, part, how):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  (path,) = glob.glob(os.path.join(workdir, "checkpoints", "6", part))
  _damage(path, how)
  cfg = tiny_config(chat_model_dir, **CONFIG)
  with pytest.raises(checkpoint.CheckpointError, match="delete .* to resume from step 4") as e:
    train(cfg, workdir, progress=False)
  bad = re.search(r"delete (\S+) to", str(e.value)).group(1)
  assert bad == os.path.join(workdir, "checkpoints", "6")
  shutil.rmtree(bad)  # as told: the run goes on from step 4 to the uninterrupted end
  train(cfg, workdir, progress=False)
  _assert_same_run(straight, workdir)


@pytest.mark.parametrize("name", ["z.safetensors", "expert.json"])
def test_a_truncated_expert_file_is_named(straight, tmp_path, name):
  expert = str(tmp_path / "expert")
  shutil.copytree(os.path.join(straight, "expert"), expert)
  _damage(os.path.join(expert, name), "truncated")
  with pytest.raises(ValueError, match=re.escape(os.path.join(expert, name))):
    t2jax.Expert.load(expert)


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted"])
def test_a_damaged_svd_cache_file_is_named_and_rebuilt(chat_model_dir, tmp_path, monkeypatch,
                                                       how):
  monkeypatch.setenv("T2JAX_CACHE", str(tmp_path / "cache"))
  first = svf.decompose(t2jax.load_model(chat_model_dir), progress=False)
  (path,) = glob.glob(str(tmp_path / "cache" / "svd" / "*" / "mlp.up_proj.v.npy"))
  _damage(path, how)
  with pytest.warns(UserWarning, match=re.escape(path)):
    again = svf.decompose(t2jax.load_model(chat_model_dir), progress=False)  # no memo
  jax.tree.map(np.testing.assert_array_equal, first.factors, again.factors)
  monkeypatch.setattr(svf, "_compute_factors", lambda *a, **k: pytest.fail("not rebuilt"))
  svf.decompose(t2jax.load_model(chat_model_dir), progress=False)  # the rebuilt cache is read
