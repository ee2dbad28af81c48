"""Atomic writes of directories and files: the new one appears whole or not at all, and an
existing one at the same path is replaced only once its successor is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def write_dir(path: str) -> Iterator[str]:
  """Yields a temp dir beside `path`; on success it is renamed to `path`."""
  path = os.path.abspath(path)
  parent, base = os.path.dirname(path), os.path.basename(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-")
  try:
    yield tmp
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
      os.rename(path, os.path.join(old, base))
    try:
      os.rename(tmp, path)
    except BaseException:
      if old:  # put the previous one back: a failed write never hides what was saved
        os.rename(os.path.join(old, base), path)
        os.rmdir(old)
      raise
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_file(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` on a temp file beside `path`, then renames it over `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{base}.tmp-", suffix=os.path.splitext(base)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """`text` to `path` atomically, synced to disk before the rename."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  write_file(path, write)
