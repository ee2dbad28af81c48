"""Every CLI answers bad input (a missing or malformed file, a config that does not load, a
bad value or type) with one `error: ...` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "syntax.py").write_text("def get_config(:\n")
  (d / "raises.py").write_text("def get_config():\n  raise ValueError('boom')\n")
  (d / "bad.gguf").write_bytes(b"GGUF\x00not really")
  return str(d)


# (module, arguments with {bad} for the folder above, what the error line must say)
CASES = [
    ("train", "--config {bad}/missing.py", "No such file or directory"),
    ("train", "--config {bad}/syntax.py", "syntax.py:1: the config file is not valid Python"),
    ("train", "--config {bad}/raises.py", "ValueError: boom"),
    ("train", "--config configs/math.py --config.no_such_key=1", "'no_such_key'"),
    ("train", "--config configs/math.py --config.steps=abc", "--config.steps=abc"),
    ("train", "--config configs/math.py --config.task=riddles", "task 'riddles' is unknown"),
    ("train", "--config configs/math.py --config.model={bad}/bad.gguf",
     "not a readable GGUF file"),
    ("train", "--config configs/math.py --no_such_flag=1", "Unknown command line flag"),
    ("generate", "--model {bad}/missing --prompt hi", "does not exist"),
    ("generate", "--prompt hi --slots 2", "--slots needs --experts"),
    ("serve", "--experts math={bad} --strategy cls_expert", "needs --cls-expert DIR"),
    ("serve", "--experts math={bad}/none", "none is not an expert directory"),
    ("evaluate", "--config configs/adapt.py", "needs --workdir"),
    ("evaluate", "--config {bad}/missing.py", "No such file or directory"),
    ("compile", "--config {bad}/raises.py", "ValueError: boom"),
    ("reproduce", "--config {bad}/syntax.py --workdir {bad}/w", "not valid Python"),
]


@pytest.mark.parametrize("module,args,says", CASES, ids=[f"{m}:{a}" for m, a, _ in CASES])
def test_bad_input_is_one_error_line(bad, module, args, says):
  proc = subprocess.run([sys.executable, "-m", f"t2jax.{module}", *args.format(bad=bad).split()],
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and says in errors[0], proc.stderr
