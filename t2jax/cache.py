"""Where derived files (SVD factors, converted tokenizers) are kept: $T2JAX_CACHE, else
$XDG_CACHE_HOME/t2jax, else ~/.cache/t2jax. Read at call time so tests can redirect it."""

from __future__ import annotations

import os


def cache_dir(kind: str) -> str:
  root = os.environ.get("T2JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "t2jax")
  return os.path.join(root, kind)
