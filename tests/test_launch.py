"""The launchers in launch/: syntax, usage errors, and the commands the pod launcher runs."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _sh(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                                          glob.glob(os.path.join(LAUNCH, "*.sbatch"))))
def test_scripts_parse_and_are_executable(script):
  assert _sh("bash", "-n", script).returncode == 0
  assert os.access(script, os.X_OK)


def test_tpu_pod_runs_the_command_on_every_worker_as_one_runtime():
  out = _sh(os.path.join(LAUNCH, "tpu_pod.sh"), "my-pod", "us-west4-a", "--project", "p1",
            "--dry-run", "--", "python", "-m", "t2jax.train", "--workdir", "runs/a b")
  assert out.returncode == 0, out.stderr
  (line,) = out.stdout.strip().splitlines()
  assert line.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone us-west4-a --project p1 "
                         "--worker=all --command ")
  assert "T2JAX_DISTRIBUTED=1\\ python\\ -m\\ t2jax.train" in line
  assert "runs/a\\\\\\ b" in line  # an argument with a space survives both shells


@pytest.mark.parametrize("args, message", [
    (["x", "--", "true"], "usage:"),
    (["2", "--devices", "0", "--", "true"], "usage:"),
    (["2", "--", "no-such-command-t2jax"], "'no-such-command-t2jax' is not on PATH"),
])
def test_local_multiprocess_refuses_bad_arguments(args, message):
  out = _sh(os.path.join(LAUNCH, "local_multiprocess.sh"), *args)
  assert out.returncode == 2 and message in out.stderr


def test_tpu_pod_refuses_bad_arguments():
  out = _sh(os.path.join(LAUNCH, "tpu_pod.sh"), "my-pod", "--", "true")
  assert out.returncode == 2 and "usage:" in out.stderr
