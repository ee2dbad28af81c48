"""Tests for t2jax.data.RecordLoader: order, coverage, sharding, resume, errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from t2jax.data import RecordLoader


def take(loader: RecordLoader, n: int) -> list[np.ndarray]:
  return [next(loader) for _ in range(n)]


def test_batch_shape_dtype_and_range():
  batch = next(RecordLoader(10, global_batch=4, seed=0))
  assert batch.shape == (4,) and batch.dtype == np.int64
  assert batch.min() >= 0 and batch.max() < 10


def test_deterministic_per_seed():
  a = take(RecordLoader(37, global_batch=8, seed=5), 12)
  b = take(RecordLoader(37, global_batch=8, seed=5), 12)
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_seed_changes_order():
  streams = [np.concatenate(take(RecordLoader(50, global_batch=10, seed=s), 15))
             for s in range(4)]
  for i in range(4):
    for j in range(i + 1, 4):
      assert not np.array_equal(streams[i], streams[j])
  # Neighbouring seeds must not be the same stream shifted by one epoch.
  assert not np.array_equal(streams[0][50:100], streams[1][:50])


@pytest.mark.parametrize("num_records,global_batch", [(30, 7), (12, 4), (5, 8), (1, 3)])
def test_every_epoch_is_a_fresh_permutation(num_records, global_batch):
  epochs = 4
  n_batches = -(-epochs * num_records // global_batch)
  flat = np.concatenate(take(RecordLoader(num_records, global_batch=global_batch, seed=1),
                             n_batches))
  perms = flat[:epochs * num_records].reshape(epochs, num_records)
  for perm in perms:
    np.testing.assert_array_equal(np.sort(perm), np.arange(num_records))
  if num_records > 3:
    assert not np.array_equal(perms[0], perms[1])
    assert not np.array_equal(perms[0], np.arange(num_records))


def test_no_shuffle_is_sequential_and_spans_epochs():
  flat = np.concatenate(take(RecordLoader(5, global_batch=3, seed=0, shuffle=False), 4))
  np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])


def test_epoch_property():
  loader = RecordLoader(10, global_batch=4, seed=0)
  seen = []
  for _ in range(6):
    seen.append(loader.epoch)
    next(loader)
  # Next record positions 0, 4, 8, 12, 16, 20 → epochs 0, 0, 0, 1, 1, 2.
  assert seen == [0, 0, 0, 1, 1, 2]


@pytest.mark.parametrize("process_count", [1, 2, 3, 6])
def test_process_shards_union_is_global_batch(process_count):
  kw = dict(global_batch=12, seed=3)
  ref = take(RecordLoader(25, **kw), 9)
  shards = [take(RecordLoader(25, process_index=p, process_count=process_count, **kw), 9)
            for p in range(process_count)]
  for k in range(9):
    parts = [shards[p][k] for p in range(process_count)]
    assert all(part.shape == (12 // process_count,) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), ref[k])


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])
def test_resume_through_json_is_exact(k):
  # 11 records, batch 4: batches 2, 5 and 8 straddle an epoch boundary.
  kw = dict(global_batch=4, seed=9, process_index=1, process_count=2)
  ref = take(RecordLoader(11, **kw), k + 8)

  first = RecordLoader(11, **kw)
  take(first, k)
  state = json.loads(json.dumps(first.get_state()))

  resumed = RecordLoader(11, **kw)
  resumed.set_state(state)
  assert resumed.epoch == first.epoch
  for want, got in zip(ref[k:], take(resumed, 8)):
    np.testing.assert_array_equal(got, want)


def test_set_state_rewinds():
  loader = RecordLoader(11, global_batch=4, seed=2)
  state = loader.get_state()
  a = take(loader, 5)
  loader.set_state(state)
  np.testing.assert_array_equal(np.concatenate(take(loader, 5)), np.concatenate(a))


def test_state_from_other_process_index_is_accepted():
  a = RecordLoader(11, global_batch=4, seed=2, process_index=0, process_count=2)
  take(a, 3)
  b = RecordLoader(11, global_batch=4, seed=2, process_index=1, process_count=2)
  b.set_state(a.get_state())
  assert b.epoch == a.epoch


@pytest.mark.parametrize("process_count", [1, 4])
def test_state_resumes_on_another_process_count(process_count):
  """Saved by 2 processes, resumed by 1 or 4: the same global batches continue."""
  kw = dict(global_batch=4, seed=2)
  saved = RecordLoader(11, process_index=0, process_count=2, **kw)
  take(saved, 3)
  state = saved.get_state()
  want = take(RecordLoader(11, **kw), 5)[3:]  # one process, uninterrupted: batches 4 and 5
  shares = []
  for p in range(process_count):
    loader = RecordLoader(11, process_index=p, process_count=process_count, **kw)
    loader.set_state(state)
    shares.append(take(loader, 2))
  for k in range(2):
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shares]), want[k])


@pytest.mark.parametrize("name,value", [("num_records", 12), ("global_batch", 6), ("seed", 3),
                                        ("shuffle", False)])
def test_state_from_other_settings_raises(name, value):
  kw = dict(num_records=11, global_batch=4, seed=2, process_count=2, shuffle=True)
  state = RecordLoader(**kw).get_state()
  kw[name] = value
  with pytest.raises(ValueError, match=name):
    RecordLoader(**kw).set_state(state)


def test_malformed_state_raises():
  with pytest.raises(ValueError, match="missing keys"):
    RecordLoader(5, global_batch=2, seed=0).set_state({"next_index": 3})


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_records=0, global_batch=4, seed=0), "num_records must be >= 1, got 0"),
    (dict(num_records=5, global_batch=0, seed=0), "global_batch must be >= 1, got 0"),
    (dict(num_records=5, global_batch=4, seed=-1), "seed must be a non-negative"),
    (dict(num_records=5, global_batch=4, seed=0, process_count=0), "process_count must be"),
    (dict(num_records=5, global_batch=4, seed=0, process_index=2, process_count=2),
     r"process_index must be in \[0, 2\).*got 2"),
    (dict(num_records=5, global_batch=4, seed=0, process_index=-1, process_count=2),
     r"process_index must be in \[0, 2\).*got -1"),
    (dict(num_records=5, global_batch=6, seed=0, process_count=4),
     "global_batch=6 is not divisible by process_count=4"),
])
def test_bad_arguments_raise(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    RecordLoader(**kwargs)


@pytest.mark.parametrize("num_records", [3, 100_000])
def test_loader_is_cheap(num_records):
  # Generous bounds (the host is shared); typical is ~2 ms to build and ~0.3 ms per step.
  start = time.perf_counter()
  loader = RecordLoader(num_records, global_batch=256, seed=0, process_index=3,
                        process_count=8)
  take(loader, 10)
  assert time.perf_counter() - start < 0.5
  batch = next(loader)
  assert batch.shape == (32,)
  if num_records > 32:
    assert len(np.unique(batch)) == 32
