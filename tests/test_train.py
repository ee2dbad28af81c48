"""The training entry point end to end on a tiny random model with the default tokenizer:
exact resume, what a run writes, refusal of an incompatible workdir, NaN stops, bad input."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import t2jax
from conftest import tiny_config
from t2jax import checkpoint, config_defaults, evaluate, reporting, rl, run_setup
from t2jax.tasks import TaskError
from t2jax.tasks.math import Arithmetic
from t2jax.train import TrainingError, every, loop, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _z(workdir: str) -> dict:
  return t2jax.Expert.load(os.path.join(workdir, "expert")).z


def test_resumed_run_ends_with_the_z_of_an_uninterrupted_one(chat_model_dir, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(tiny_config(chat_model_dir), straight, progress=False)
  train(tiny_config(chat_model_dir, steps=2), resumed, progress=False)
  seen = []  # a caller's hook sees the resumed steps only, after the update
  train(tiny_config(chat_model_dir), resumed, progress=False,
        hooks=[lambda step, state, metrics, *, last: seen.append(
            (step, int(state.step), last, "kl" in metrics and "reward" in metrics))])
  assert seen == [(3, 3, False, True), (4, 4, True, True)]
  z_a, z_b = _z(straight), _z(resumed)
  assert z_a.keys() == z_b.keys()
  for k in z_a:
    np.testing.assert_array_equal(z_a[k], z_b[k])
  assert max(np.abs(v - 1.0).max() for v in z_a.values()) > 1e-4  # training moved z
  for workdir in (straight, resumed):
    lines = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [d["step"] for d in lines if d["kind"] == "train"] == [1, 2, 3, 4]
    assert all(np.isfinite(d["kl"]) and "rollout_s" in d and "update_s" in d
               for d in lines if d["kind"] == "train")
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    with open(os.path.join(workdir, "plot.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    assert set(summary["base"]) == {"val", "test"} and summary["expert"]["test"]["count"] == 4
  # the exported expert works through the public API
  model = t2jax.load_model(chat_model_dir)
  expert = t2jax.Expert.load(os.path.join(resumed, "expert"))
  assert model.logits([[5, 6, 7]], expert).shape == (1, 3, model.config.vocab_size)


def test_loop_runs_each_hook_after_every_step_and_every_n_at_multiples_and_the_last():
  calls = []
  record = lambda name: lambda step, state, metrics, *, last: calls.append(
      (name, step, state, metrics["at"], last))
  final = loop(10, range(2, 7), lambda state, step: (state + 1, {"at": step}),
               [record("all"), every(3, record("3")), every(0, record("never"))])
  assert final == 15
  assert [c for c in calls if c[0] == "all"] == [
      ("all", 3, 11, 2, False), ("all", 4, 12, 3, False), ("all", 5, 13, 4, False),
      ("all", 6, 14, 5, False), ("all", 7, 15, 6, True)]
  assert [c[1:] for c in calls if c[0] == "3"] == [(3, 11, 2, False), (6, 14, 5, False),
                                                   (7, 15, 6, True)]
  assert not [c for c in calls if c[0] == "never"]
  assert calls[:2] == [("all", 3, 11, 2, False), ("3", 3, 11, 2, False)]  # in the given order


def test_eval_keeps_the_best_val_expert(chat_model_dir, tmp_path, monkeypatch):
  """Val accuracy 0.5 after step 1, 0.25 after step 2: step 1's expert is kept and exported.
  The scores are stubbed (in the order train asks for them): the random model scores 0 at
  every step, which keeping the first, the last or any expert would pass."""
  accuracies = iter([0.0, 0.0, 0.5, 0.25, 0.5, 0.0])  # base val, test; steps 1, 2; final
  monkeypatch.setattr(evaluate, "score", lambda *a, **k: {
      "accuracy": next(accuracies), "reward": 0.0, "count": 4})
  workdir = str(tmp_path / "run")
  train(tiny_config(chat_model_dir, steps=2, eval_every=1), workdir, progress=False)
  lines = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [d for d in lines if d["kind"] == "eval" and d["split"] == "val"]
  assert [(d["step"], d["accuracy"]) for d in evals] == [(1, 0.5), (2, 0.25)]
  best = t2jax.Expert.load(os.path.join(workdir, "best_expert"))
  assert (best.metrics["val_accuracy"], best.metrics["step"]) == (0.5, 1)
  exported = t2jax.Expert.load(os.path.join(workdir, "expert"))
  assert exported.metrics["step"] == 1
  for k in best.z:
    np.testing.assert_array_equal(exported.z[k], best.z[k])


def test_incompatible_workdir_is_refused_and_kept(chat_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train(tiny_config(chat_model_dir, steps=2), workdir, progress=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"seed.*saved 0, now 1"):
    train(tiny_config(chat_model_dir, steps=4, seed=1), workdir, progress=False)
  with pytest.raises(checkpoint.CheckpointError, match="parametrisation"):
    train(tiny_config(chat_model_dir, steps=4, parametrisation="paper"), workdir, progress=False)
  assert checkpoint.Checkpoints(os.path.join(workdir, "checkpoints")).latest_step() == 2
  # the optax chain (clipping) and the learning-rate schedule must continue as they were saved
  with pytest.raises(checkpoint.CheckpointError, match=r"grad_clip.*saved 1.0, now 0"):
    train(tiny_config(chat_model_dir, steps=4, grad_clip=0.0), workdir, progress=False)
  with pytest.raises(checkpoint.CheckpointError, match="lr"):
    train(tiny_config(chat_model_dir, steps=4, lr=0.5), workdir, progress=False)
  # z and the optimizer state were saved per layer ("auto" unrolls on the CPU); stacked for
  # scanned layers they are another tree ("True" as --config.scan_layers=True sets it)
  with pytest.raises(checkpoint.CheckpointError, match=r"scan_layers.*saved False, now True"):
    train(tiny_config(chat_model_dir, steps=4, scan_layers="True"), workdir, progress=False)


def test_checkpoints_compare_the_layer_layout_they_hold(tmp_path):
  """scan_layers is compared as the layout it resolves to: a checkpoint saved before the key
  existed holds unrolled layers, and an "auto" saved before it was resolved counts as this
  backend's."""
  base = {"model": "m", "seed": 0}
  for i, (saved, ok, refused) in enumerate([
      (base, (False, "auto"), (True,)),  # older than scan_layers: unrolled
      ({**base, "scan_layers": "auto"}, (False, "auto"), (True,)),  # on this CPU backend
      ({**base, "scan_layers": True}, (True,), (False, "auto"))]):
    ckpt = checkpoint.Checkpoints(str(tmp_path / str(i)))
    ckpt.save(1, {"z": np.ones(3, np.float32)}, {}, saved, "fp")
    ckpt.wait()
    for now in ok:
      ckpt.check_compatible({**base, "scan_layers": now}, "fp")
    for now in refused:
      with pytest.raises(checkpoint.CheckpointError, match="scan_layers"):
        ckpt.check_compatible({**base, "scan_layers": now}, "fp")
    ckpt.close()


def test_configs_saved_before_the_adapter_keys_read_as_svf_by_rl_and_lora_keys_count_for_lora(
    tmp_path):
  """A run saved before config.adapter existed was SVF by RL: it resumes under today's
  defaults (reproduce compares its training_config.json the same way); lora_* are compared
  only in LoRA runs."""
  defaults = config_defaults.base_config()
  for key in ("adapter", "objective", "lora_rank", "lora_alpha", "lora_dropout"):
    assert checkpoint.config_value({}, key) == defaults[key]
  base = {"model": "m", "seed": 0}
  for i, (adapter, refused) in enumerate((("svf", False), ("lora", True))):
    ckpt = checkpoint.Checkpoints(str(tmp_path / str(i)))
    ckpt.save(1, {"z": np.ones(3, np.float32)}, {}, {**base, "adapter": adapter,
                                                     "lora_rank": 16}, "fp")
    ckpt.wait()
    now = {**base, "adapter": adapter, "lora_rank": 8}
    if refused:
      with pytest.raises(checkpoint.CheckpointError, match="lora_rank"):
        ckpt.check_compatible(now, "fp")
    else:
      ckpt.check_compatible(now, "fp")
    with pytest.raises(checkpoint.CheckpointError, match="adapter"):
      ckpt.check_compatible({**now, "adapter": "svf" if refused else "lora"}, "fp")
    ckpt.close()


def test_a_decaying_schedule_keeps_its_horizon(chat_model_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train(tiny_config(chat_model_dir, steps=2, schedule="cosine"), workdir, progress=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"steps.*saved 2, now 4"):
    train(tiny_config(chat_model_dir, steps=4, schedule="cosine"), workdir, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(chat_model_dir, tmp_path,
                                                           monkeypatch):
  workdir = str(tmp_path / "run")
  train(tiny_config(chat_model_dir, steps=1, checkpoint_every=1), workdir, progress=False)
  real = rl.loss_fn

  def poisoned(*args, **kwargs):
    loss, metrics = real(*args, **kwargs)
    return loss * float("nan"), {**metrics, "loss": loss * float("nan")}

  monkeypatch.setattr(rl, "loss_fn", poisoned)
  with pytest.raises(TrainingError, match=r"step 2: .*loss.*Last good checkpoint: step 1"):
    train(tiny_config(chat_model_dir, steps=3, checkpoint_every=1), workdir, progress=False)
  assert checkpoint.Checkpoints(os.path.join(workdir, "checkpoints")).latest_step() == 1


def test_nan_reward_stops_before_the_update(chat_model_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(Arithmetic, "reward", lambda self, rec, text: float("nan"))
  with pytest.raises(TrainingError, match="step 1: the task returned a non-finite reward"):
    train(tiny_config(chat_model_dir, steps=1), str(tmp_path / "run"), progress=False)


def test_missing_dataset_is_reported_before_anything_is_written(chat_model_dir, tmp_path):
  cfg = tiny_config(chat_model_dir)
  cfg.task = "gsm8k"
  cfg.task_args = {"train_path": str(tmp_path / "nope.jsonl"),
                   "test_path": str(tmp_path / "nope.jsonl")}
  workdir = tmp_path / "run"
  with pytest.raises(TaskError, match="nope.jsonl does not exist"):
    train(cfg, str(workdir), progress=False)
  assert not workdir.exists()


def test_malformed_jsonl_names_file_and_line(chat_model_dir, tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
  cfg = tiny_config(chat_model_dir)
  cfg.task = "gsm8k"
  cfg.task_args = {"train_path": str(path), "test_path": str(path)}
  with pytest.raises(TaskError, match=r"train.jsonl:2: not valid JSON"):
    train(cfg, str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "batch_size must be >= 1"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("eval_every", -1, "eval_every must be >= 0"),
])
def test_bad_config_values_are_named(key, value, message):
  cfg = config_defaults.base_config()
  cfg[key] = value
  with pytest.raises(run_setup.ConfigValueError, match=message):
    run_setup.check_config(cfg)


def test_leave_one_out_needs_several_samples():
  cfg = config_defaults.base_config()
  cfg.update(samples_per_prompt=1, temperature=0.0)
  with pytest.raises(run_setup.ConfigValueError, match="leave_one_out"):
    run_setup.check_config(cfg)


def test_unknown_task_setting_is_named():
  from t2jax.tasks import make_task  # pylint: disable=import-outside-toplevel

  with pytest.raises(TaskError, match=r"no setting\(s\) \['levle'\]"):
    make_task("math", {"levle": 2})


def _load_config(name: str):
  return config_defaults.config_module(os.path.join(ROOT, "configs", name))


@pytest.mark.parametrize("name", ["math.py", "math_cot.py", "math_lora_sft.py", "math_lora_rl.py",
                                  "paper_gsm8k.py"])
def test_config_files_hold_their_command_and_every_key(name):
  module = _load_config(name)
  assert f"python -m t2jax.train --config configs/{name}" in module.__doc__
  cfg = module.get_config()
  assert set(cfg.keys()) == set(config_defaults.base_config().keys())
  run_setup.check_config(cfg)


def test_adapt_cot_suite_scores_math_as_math_cot_trains():
  train, adapt = _load_config("math_cot.py").get_config(), _load_config("adapt.py")
  cot, direct = adapt.get_config("cot"), adapt.get_config("own")
  assert cot.task_args.math.to_dict() == train.task_args.to_dict()
  assert cot.max_new_tokens.math == train.max_new_tokens
  assert direct.task_args.math.to_dict() == _load_config("math.py").get_config().task_args.to_dict()
  with pytest.raises(ValueError, match="unknown math suite"):
    adapt.get_config("long")


def test_paper_config_is_the_official_recipe():
  cfg = _load_config("paper_gsm8k.py").get_config()
  assert (cfg.parametrisation, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.batch_size,
          cfg.samples_per_prompt, cfg.temperature, cfg.baseline, cfg.kl,
          cfg.logprob_norm) == ("paper", "adam", 2e-3, 1e-3, 256, 1, 0.0, "none", "off", "sum")
  assert cfg.targets == r"mlp/(gate|up|down)_proj"


def test_cli_refuses_an_unknown_config_key(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "t2jax.train", "--config", os.path.join(ROOT, "configs/math.py"),
       "--config.no_such_key=1", "--workdir", str(tmp_path / "run")],
      capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert out.returncode != 0
  assert "no_such_key" in out.stderr
  assert not (tmp_path / "run").exists()


def test_eval_subset_is_fixed_and_not_the_sorted_head():
  records = [{"i": i} for i in range(100)]
  a, b = run_setup.eval_subset(records, 10), run_setup.eval_subset(records, 10)
  assert a == b and len(a) == 10 and len({r["i"] for r in a}) == 10
  assert max(r["i"] for r in a) >= 50  # drawn across the split, not records[:10]
  assert run_setup.eval_subset(records, 0) == records
