"""Training input pipeline: an endless, resumable stream of record indices built on grain.

The trainer keeps a task's records in a Python list; this module only decides which indices
each step trains on, so a restart from a checkpoint sees exactly the same batches.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import numpy as np

# Settings that fix the global index stream; a saved state is only valid for a loader that
# agrees on all of them. process_index and process_count are not: every process computes the
# same global batches and keeps its share, so a run saved on N processes resumes on M.
_SETTINGS = ("num_records", "global_batch", "seed", "shuffle")


class _EpochShuffled(grain.MapDataset):
  """Endless grain source: position i is record perm_e[i % n] of epoch e = i // n.

  grain's own MapDataset.shuffle computes each index with a cycle-walking index shuffle that
  costs ~25_000 / n microseconds per element for small n (~1 s per 256-batch at n = 5), and
  it seeds epoch e with seed + e, so seeds s and s + 1 give the same stream one epoch apart. A numpy
  permutation per epoch, seeded with (seed, epoch), is O(1) per element after O(n) per epoch.
  """

  def __init__(self, num_records: int, seed: int):
    super().__init__()
    self._num_records = num_records
    self._seed = seed
    self._perms: dict[int, np.ndarray] = {}  # epoch → int64 [num_records]

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"_EpochShuffled(num_records={self._num_records}, seed={self._seed})"

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      # Positions are read in increasing order, so older epochs are not needed again
      # (after a rewinding set_state they are simply recomputed).
      if len(self._perms) >= 2:
        del self._perms[min(self._perms)]
      rng = np.random.default_rng([self._seed, epoch])
      self._perms[epoch] = rng.permutation(self._num_records)
    return self._perms[epoch]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self._num_records)
    return int(self._perm(epoch)[position])


class RecordLoader:
  """Endless, deterministic stream of record indices for training, built on grain.

  Global batch k holds positions [k*B, (k+1)*B) of the concatenation of per-epoch
  permutations of range(num_records), B = global_batch. Batches span epoch boundaries (no
  remainder is dropped), so every epoch visits every record exactly once and a batch can mix
  the tail of one epoch with the head of the next. Each epoch is reshuffled (shuffle=True);
  with shuffle=False every epoch is 0, 1, ..., num_records - 1.

  Each process computes the whole global batch and keeps its contiguous share
  [p*per, (p+1)*per), per = global_batch // process_count, so the global batch at step k does
  not depend on how many processes read it.
  """

  def __init__(self, num_records: int, *, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    if num_records < 1:
      raise ValueError(f"num_records must be >= 1, got {num_records}: the task has no train "
                       "records; check the dataset split or filters.")
    if global_batch < 1:
      raise ValueError(f"global_batch must be >= 1, got {global_batch}.")
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    if process_count < 1:
      raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}) for "
                       f"process_count={process_count}, got {process_index}; pass "
                       "jax.process_index() and jax.process_count().")
    if global_batch % process_count:
      raise ValueError(f"global_batch={global_batch} is not divisible by "
                       f"process_count={process_count}; choose a global_batch that is a "
                       f"multiple of {process_count} so every process gets an equal share.")
    self.num_records = int(num_records)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.shuffle = bool(shuffle)
    self._per_process = self.global_batch // self.process_count

    # Both sources are endless, so a batch may take records from more than one epoch.
    if self.shuffle:
      ds = _EpochShuffled(self.num_records, self.seed)
    else:
      ds = grain.MapDataset.range(self.num_records).repeat(None)
    ds = ds.batch(self.global_batch)
    # No prefetch threads: an index batch costs under a millisecond and the host's cores
    # belong to the trainer; a synchronous iterator also makes get_state exact without
    # draining a prefetch buffer.
    self._it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

  def __iter__(self) -> RecordLoader:
    return self

  def __next__(self) -> np.ndarray:
    """Returns int64 [global_batch // process_count]: this process's share of the next batch."""
    batch_B = np.asarray(next(self._it), dtype=np.int64)
    lo = self.process_index * self._per_process
    return batch_B[lo:lo + self._per_process].copy()

  @property
  def step(self) -> int:
    """Number of global batches produced so far."""
    return int(self._it.get_state()["next_index"])

  @property
  def epoch(self) -> int:
    """0-based epoch of the next record to be produced."""
    return self.step * self.global_batch // self.num_records

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: grain's iterator state plus the settings it is valid for."""
    return {"grain": dict(self._it.get_state()), "process_count": self.process_count,
            **{name: getattr(self, name) for name in _SETTINGS}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a state from get_state; raises ValueError if it came from other settings."""
    missing = [k for k in ("grain", *_SETTINGS) if k not in state]
    if missing:
      raise ValueError(f"Not a RecordLoader state: missing keys {missing}.")
    for name in _SETTINGS:
      if state[name] != getattr(self, name):
        raise ValueError(f"Loader state was saved with {name}={state[name]!r} but this loader "
                         f"has {name}={getattr(self, name)!r}; restore with the settings the "
                         "checkpoint was trained with, or start the data stream afresh.")
    self._it.set_state(dict(state["grain"]))
