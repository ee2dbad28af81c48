"""Time to decompose every MLP matrix of the default model: cold (SVD) and from the disk cache.

    python bench/svd_decompose.py [--targets REGEX] [--rank R]

Uses a fresh temporary cache directory, so "cold" really computes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--targets", default=None)
  p.add_argument("--rank", type=int, default=None)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as cache:
    os.environ["T2JAX_CACHE"] = cache
    import t2jax  # pylint: disable=import-outside-toplevel
    from t2jax import svf  # pylint: disable=import-outside-toplevel

    model = t2jax.load_model()
    t0 = time.perf_counter()
    dec = svf.decompose(model, args.targets, args.rank, progress=False)
    cold = time.perf_counter() - t0
    n = len(dec.modules()) * model.config.num_layers
    fresh = t2jax.load_model()  # a new Model object: no in-memory memo, only the disk cache
    t0 = time.perf_counter()
    svf.decompose(fresh, args.targets, args.rank, progress=False)
    cached = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
  print(json.dumps({"matrices": n, "targets": dec.targets, "rank": dec.rank,
                    "cold_s": round(cold, 2), "cached_s": round(cached, 2),
                    "cache_mb": round(size / 2**20, 1)}))


if __name__ == "__main__":
  main()
