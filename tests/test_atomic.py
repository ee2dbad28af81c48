"""Atomic writes: a failed write leaves what was saved before exactly where it was."""

from __future__ import annotations

import os

import pytest

from t2jax import atomic


def _write(path: str, text: str) -> None:
  with atomic.write_dir(path) as tmp:
    with open(os.path.join(tmp, "f.txt"), "w", encoding="utf-8") as f:
      f.write(text)


def test_write_dir_replaces_a_previous_dir(tmp_path):
  path = str(tmp_path / "expert")
  _write(path, "one")
  _write(path, "two")
  assert (tmp_path / "expert" / "f.txt").read_text() == "two"
  assert os.listdir(tmp_path) == ["expert"]  # no temp or old dirs left behind


def test_a_failed_final_rename_keeps_the_previous_dir(tmp_path, monkeypatch):
  path = str(tmp_path / "expert")
  _write(path, "one")
  real = os.rename
  calls = []

  def flaky(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:  # the first moves the old dir aside, the second puts the new in place
      raise OSError("disk full")
    return real(src, dst)

  monkeypatch.setattr(os, "rename", flaky)
  with pytest.raises(OSError, match="disk full"):
    _write(path, "two")
  monkeypatch.undo()
  assert (tmp_path / "expert" / "f.txt").read_text() == "one"
  assert os.listdir(tmp_path) == ["expert"]


def test_a_failed_write_file_leaves_the_old_file(tmp_path):
  path = str(tmp_path / "a.json")
  atomic.write_text(path, "old")

  def broken(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("half")
    raise RuntimeError("crash")

  with pytest.raises(RuntimeError):
    atomic.write_file(path, broken)
  assert open(path, encoding="utf-8").read() == "old"
  assert os.listdir(tmp_path) == ["a.json"]
