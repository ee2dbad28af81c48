"""Atomic directory writes: the new directory appears whole or not at all, and an existing one
at the same path is replaced only once its successor is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


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
    os.rename(tmp, path)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
