"""The adaptation tables (adapt_eval.py) and the one-command reproduction (reproduce.py): cells
hold each record's outcome and are reused on a rerun, intervals come from those outcomes, and
reproduce trains only what is not trained yet."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess

import numpy as np
import pytest

import t2jax
from t2jax import adapt, adapt_eval, reproduce, stats
from t2jax.config_defaults import config_module
from t2jax.tasks import make_task


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


pytestmark = pytest.mark.usefixtures("private_cache")


@dataclasses.dataclass(frozen=True)
class Parity:
  """A target task whose outcome depends on every character generated (the sum of their code
  points is even), so a random model's rows differ and the intervals have width."""
  name: str = "parity"

  def records(self, split):
    return [{"question": f"{split} question {i}: say something."} for i in range(6)]

  def messages(self, record):
    return [{"role": "user", "content": record["question"]}]

  def correct(self, record, completion):
    return sum(map(ord, completion)) % 2 == 0

  def reward(self, record, completion):
    return float(self.correct(record, completion))

  def reference(self, record):
    return "ab"


@pytest.fixture(autouse=True)
def _parity_task(monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel

  from t2jax import tasks as tasks_lib  # pylint: disable=import-outside-toplevel

  module = types.ModuleType("t2jax_test_parity")
  module.Parity = Parity
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setitem(tasks_lib._REGISTRY, "parity", (module.__name__, "Parity"))


def _expert(model, scale: float, seed: int, name: str) -> t2jax.Expert:
  base = t2jax.Expert.init(model, name=name)
  rng = np.random.default_rng(seed)
  z = {k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(np.float32)
       for k, v in base.z.items()}
  return dataclasses.replace(base, z=z)


def test_parse_experts_and_tasks_errors():
  assert adapt_eval.parse_experts("math=a, code=b") == {"math": "a", "code": "b"}
  for bad in ("", "math", "math=a,math=b", "other=a", "=a"):
    with pytest.raises(ValueError):
      adapt_eval.parse_experts(bad)
  assert adapt_eval.parse_tasks("math=math_word, code=humaneval,reasoning") == {
      "math": "math_word", "code": "humaneval", "reasoning": "reasoning"}
  for bad in ("", "math=a,math=b"):
    with pytest.raises(ValueError):
      adapt_eval.parse_tasks(bad)
  assert adapt_eval.parse_baselines("lora:math=a, lora:code=b,sft:math=c", ["math", "code"]) == {
      "lora": {"math": "a", "code": "b"}, "sft": {"math": "c"}}
  for bad, why in (("lora=a", "ROW:LABEL=DIR"), ("lora:chem=a", "not one of"),
                   ("expert:math=a", "reserved"), ("lora:math=a,lora:math=b", "repeated")):
    with pytest.raises(ValueError, match=why):
      adapt_eval.parse_baselines(bad, ["math", "code"])


def test_a_lora_expert_is_a_baseline_row_not_a_mixed_expert(model, tmp_path):
  lora_dir = str(tmp_path / "lora")
  t2jax.LoRAExpert.init(model, rank=2).save(lora_dir)
  assert isinstance(adapt_eval.load_expert("m", lora_dir, model, svf_only=False),
                    t2jax.LoRAExpert)
  with pytest.raises(ValueError, match="config.baselines"):
    adapt_eval.load_expert("math", lora_dir, model)


def test_target_config_holds_out_what_experts_and_classifier_trained_on():
  adapt_cfg = config_module(os.path.join(CONFIGS, "adapt.py")).get_config()
  reasoning = config_module(os.path.join(CONFIGS, "reasoning.py")).get_config()
  cls_cfg = config_module(os.path.join(CONFIGS, "cls.py")).get_config()
  tasks = adapt_eval.parse_tasks(adapt_cfg.tasks)
  assert tasks == {"math": "math_word", "code": "humaneval", "reasoning": "reasoning"}
  trained = set(reasoning.task_args.kinds.split(","))
  held_out = set(adapt_cfg.task_args.reasoning.kinds.split(","))
  assert trained and held_out and not trained & held_out
  # the classifier reads reasoning prompts of the trained families only
  assert cls_cfg.task_args.source_args.reasoning.kinds == reasoning.task_args.kinds
  # ... with the same prompts; an expert's reward settings are no part of the classifier's run
  assert cls_cfg.task_args.source_args.reasoning.to_dict() == {
      k: v for k, v in reasoning.task_args.items() if not k.startswith("reward_")}
  shaped = config_module(os.path.join(CONFIGS, "reasoning.py")).get_config()
  shaped.task_args.reward_no_choice = -1.0
  prompt_args = config_module(os.path.join(CONFIGS, "cls.py"))._prompt_args(shaped)
  assert prompt_args == reasoning.task_args.to_dict()
  target = make_task("reasoning", adapt_cfg.task_args.reasoning.to_dict())
  train = make_task("reasoning", reasoning.task_args.to_dict())
  assert {r["kind"] for r in target.records("test")} == held_out
  assert not {r["stem"] for r in target.records("test")} & {r["stem"] for r in
                                                          train.records("train")}


def _table_config(model, experts, cls_dir, **kw):
  cfg = config_module(os.path.join(CONFIGS, "adapt.py")).get_config("own")
  dirs = {}
  for name, e in experts.items():
    dirs[name] = e
  cfg.model = model.source
  cfg.experts = ",".join(f"{n}={d}" for n, d in dirs.items())
  cfg.cls_expert = cls_dir
  # parity: outcomes that differ between rows; reasoning has no expert ("other" is right)
  cfg.tasks = "math=parity,reasoning"
  cfg.task_args = {"math": {}, "reasoning": {}}
  cfg.eval_size = 5
  cfg.eval_batch_size = 4  # two chunks, the last one padded
  cfg.max_new_tokens = {"math": 3, "reasoning": 3}
  cfg.few_shot.update(shots=2, population=3, elites=1, iterations=2)
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="module")
def expert_dirs(model, tmp_path_factory):
  root = tmp_path_factory.mktemp("experts")
  out = {}
  for name, scale, seed in (("math", 0.8, 1), ("code", 0.8, 2), ("cls", 0.5, 3)):
    out[name] = str(root / name)
    _expert(model, scale, seed, name).save(out[name])
  return out


def test_table_cells_hold_outcomes_intervals_and_are_reused(model, expert_dirs, tmp_path,
                                                           monkeypatch):
  experts = {n: expert_dirs[n] for n in ("math", "code")}
  cfg = _table_config(model, experts, expert_dirs["cls"])
  work = str(tmp_path / "w")
  out = adapt_eval.run(cfg, work)
  saved = json.loads((tmp_path / "w" / "results.json").read_text())
  target = saved["target"]
  assert set(target["rows"]) == {"base", "expert:math", "expert:code", "prompt", "cls_expert",
                                 "few_shot"}
  assert target["rows"] == out["target"]["rows"]
  # the base cell: each record's outcome, as a separate greedy generation scores it
  suite = adapt_eval.make_suite("math", "parity", {}, 5, 3)
  gen = t2jax.generate(model, suite.tokens(model), max_new_tokens=3)
  cell = json.loads(open(os.path.join(work, "cells", "target__base__math.json")).read())
  assert cell["outcomes"] == [float(suite.task.correct(r, t))
                              for r, t in zip(suite.records, gen.texts)]
  assert cell["texts"] == gen.texts
  for row, cells in target["rows"].items():
    for label, c in cells.items():
      assert c["n"] == 5 and c["lo"] <= c["accuracy"] <= c["hi"], (row, label)
  assert 0 < np.mean(cell["outcomes"]) < 1  # a signal: the interval has width
  want = stats.bootstrap_ci(np.asarray(cell["outcomes"]), seed=0)
  assert tuple(target["rows"]["base"]["math"][k] for k in ("accuracy", "lo", "hi")) == want
  assert set(target["paired"]) >= {"prompt − base", "few_shot − base",
                                    "few_shot − best single expert"}
  for strategy in ("prompt", "cls_expert"):
    d = target["dispatch"][strategy]
    assert d["labels"] == ["math", "code", "other"]
    assert all(sum(c.values()) == 5 for c in d["confusion"].values())
  warm = target["timing"]["warm_prompt"]["math"]
  assert warm["rows"] == 4 and warm["pass1_fraction"] == warm["pass1_s"] / warm["pass2_s"]
  assert len(target["few_shot"]["math"]["history"]) == 2
  assert os.path.isfile(tmp_path / "w" / "few_shot_alpha_math.json")
  assert os.path.getsize(tmp_path / "w" / "results.png") > 1000
  assert "| expert:code |" in (tmp_path / "w" / "results.md").read_text()

  # a rerun generates nothing: every cell is reused
  def refuse(*a, **k):
    raise AssertionError("a finished cell was recomputed")
  with monkeypatch.context() as m:
    m.setattr(adapt_eval, "generate", refuse)
    m.setattr(adapt, "generate", refuse)
    again = adapt_eval.run(cfg, work)
  assert again["target"]["rows"] == out["target"]["rows"]
  # a changed setting recomputes the cells it touches, and only those
  before = {f: os.path.getmtime(os.path.join(work, "cells", f))
            for f in os.listdir(os.path.join(work, "cells"))}
  cfg.max_new_tokens.math = 2
  adapt_eval.run(cfg, work)
  changed = {f for f, t in before.items()
             if os.path.getmtime(os.path.join(work, "cells", f)) != t}
  assert changed and all("__math" in f for f in changed)
  assert "target__base__math.json" in changed


def test_training_config_overrides(tmp_path):
  import ml_collections  # pylint: disable=import-outside-toplevel

  spec = ml_collections.ConfigDict({"config": "reasoning.py",
                                    "overrides": {"steps": 3, "task_args": {"test_size": 7}}})
  cfg = reproduce.training_config(spec)
  assert cfg.steps == 3 and cfg.task_args.test_size == 7 and cfg.task == "reasoning"
  spec.overrides.no_such_key = 1
  with pytest.raises(ValueError, match="no_such_key"):
    reproduce.training_config(spec)
  with pytest.raises(FileNotFoundError, match="no_such.py"):
    reproduce.training_config(ml_collections.ConfigDict({"config": "no_such.py"}))


def _tiny_run(chat_model_dir: str, task_args: dict, **overrides) -> dict:
  return {"model": chat_model_dir, "steps": 2, "batch_size": 2, "samples_per_prompt": 2,
          "max_new_tokens": 3, "temperature": 1.0, "eval_every": 0, "eval_size": 4,
          "test_size": 4, "eval_batch_size": 4, "checkpoint_every": 1, "microbatches": 1,
          "task_args": task_args, **overrides}


def test_reproduce_trains_what_is_missing_and_resumes_cells(chat_model_dir, tmp_path,
                                                           monkeypatch, capsys):
  import ml_collections  # pylint: disable=import-outside-toplevel

  cfg = config_module(os.path.join(CONFIGS, "paper_mini.py")).get_config()
  cfg.model = chat_model_dir
  cfg.train = ml_collections.ConfigDict({"math": {
      "config": "math.py", "prior_step_s": 1.0, "prior_eval_s": 1.0,
      "overrides": _tiny_run(chat_model_dir, {"level": 1, "system_prompt": "Add."})}})
  cfg.cls = {"config": "cls.py", "prior_step_s": 1.0, "prior_eval_s": 1.0,
             "overrides": _tiny_run(chat_model_dir, {"sources": "math", "per_source": 10},
                                    max_new_tokens=2)}
  # a LoRA baseline (next-token trained) scored beside the math expert
  cfg.baselines_train = ml_collections.ConfigDict({"lora_sft": {
      "config": "math_lora_sft.py", "prior_step_s": 1.0, "prior_eval_s": 1.0, "label": "math",
      "overrides": _tiny_run(chat_model_dir, {"level": 1, "system_prompt": "Add."},
                             lora_rank=2, warmup_steps=0)}})
  cfg.tasks = "math=math"
  cfg.task_args = {"math": {"level": 1, "system_prompt": "Add."}}
  cfg.max_new_tokens = {"math": 3}
  cfg.eval_size, cfg.eval_batch_size, cfg.own_size = 4, 4, 4
  cfg.few_shot.update(shots=2, population=3, elites=1, iterations=1)
  work = str(tmp_path / "paper")
  first = reproduce.reproduce(cfg, work)
  # the estimate's plan counts exactly the work the cells report (none left at the end)
  done, planned = re.findall(r"\((\d+)/(\d+) work units\)", capsys.readouterr().out)[-1]
  assert done == planned
  assert first["own"]["labels"] == ["math"]
  assert set(first["own"]["rows"]) == {"base", "expert", "lora_sft"}
  assert set(first["own"]["paired"]) == {"lora_sft − base", "lora_sft − expert"}
  lora_expert = t2jax.load_expert(os.path.join(work, "experts", "lora_sft", "expert"))
  cfg_model = t2jax.load_model(chat_model_dir).config
  d, f = cfg_model.hidden_size, cfg_model.intermediate_size
  assert first["own"]["params"]["lora_sft"]["math"] == lora_expert.num_params == \
      2 * 3 * (d + f) * cfg_model.num_layers  # rank 2, gate/up/down: each in + out = d + f
  assert first["own"]["params"]["expert"]["math"] == \
      3 * min(d, f) * cfg_model.num_layers  # one z entry per singular value
  assert set(first["target"]["rows"]) == {"base", "expert:math", "lora_sft", "prompt",
                                          "cls_expert", "few_shot"}
  assert "| lora_sft |" in open(os.path.join(work, "results.md"), encoding="utf-8").read()
  assert reproduce.is_trained(os.path.join(work, "experts", "math"))
  assert reproduce.is_trained(os.path.join(work, "experts", "cls"))
  assert set(first["training"]) == {"math", "cls", "lora_sft"}

  # rerun after losing one cell: nothing is trained again, only that cell is recomputed
  def no_training(*a, **k):
    raise AssertionError("a finished expert was trained again")
  monkeypatch.setattr(subprocess, "run", no_training)
  os.remove(os.path.join(work, "cells", "target__few_shot__math.json"))
  second = reproduce.reproduce(cfg, work)
  assert second["target"]["rows"] == first["target"]["rows"]
  assert second["own"] == first["own"]


def test_an_unusable_sandbox_is_refused_before_any_generation(model, expert_dirs, tmp_path,
                                                              monkeypatch):
  from t2jax.tasks import sandbox  # pylint: disable=import-outside-toplevel

  cfg = _table_config(model, {"math": expert_dirs["math"]}, "")
  cfg.tasks, cfg.task_args, cfg.max_new_tokens = "code", {"code": {}}, {"code": 3}
  broken = sandbox.Result(timed_out=False, returncode=1, stdout="",
                          stderr="bwrap: execvp /tmp/venv/bin/python: No such file or directory",
                          seconds=0.1, isolated=True, passed=False)
  monkeypatch.setattr(sandbox, "run", lambda *a, **k: broken)

  def refuse(*a, **k):
    raise AssertionError("generated before checking the sandbox")
  monkeypatch.setattr(adapt_eval, "generate", refuse)
  with pytest.raises(ValueError, match=r"'code' scores programs.*execvp"):
    adapt_eval.run(cfg, str(tmp_path / "w"))
  assert not os.listdir(tmp_path / "w" / "cells")


def test_a_changed_recipe_is_not_reused(tmp_path):
  """reproduce records each run's training config; a run of another config is refused with a
  message naming the keys, and nothing of it is touched."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  run = str(tmp_path / "experts" / "reasoning")
  spec = ml_collections.ConfigDict({"config": "reasoning.py", "overrides": {"steps": 3}})
  reproduce.check_run_config(run, reproduce.training_config(spec))
  reproduce.check_run_config(run, reproduce.training_config(spec))  # the same: accepted
  saved = open(os.path.join(run, reproduce.CONFIG_FILE), encoding="utf-8").read()
  assert json.loads(saved)["steps"] == 3
  spec.overrides.steps = 4
  spec.overrides.task_args = {"test_size": 7}
  with pytest.raises(ValueError, match=r"differs in \['steps', 'task_args'\]"):
    reproduce.check_run_config(run, reproduce.training_config(spec))
  assert open(os.path.join(run, reproduce.CONFIG_FILE), encoding="utf-8").read() == saved


def test_a_run_recorded_before_scan_layers_existed_is_the_unrolled_layout(tmp_path):
  """Runs recorded before config.scan_layers had unrolled layers: the current config ("auto",
  unrolled on this CPU) reuses them; asking for scanned layers is refused, naming the key."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  run = str(tmp_path / "experts" / "math")
  spec = ml_collections.ConfigDict({"config": "math.py", "overrides": {"steps": 3}})
  cfg = reproduce.training_config(spec)
  assert cfg.scan_layers == "auto"
  old = json.loads(cfg.to_json_best_effort(sort_keys=True))
  for key in ("scan_layers", "adapter", "objective", "lora_rank", "lora_alpha", "lora_dropout"):
    del old[key]  # none existed then
  os.makedirs(run)
  with open(os.path.join(run, reproduce.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(old, f)
  reproduce.check_run_config(run, cfg)  # accepted
  spec.overrides.scan_layers = "True"
  with pytest.raises(ValueError, match=r"differs in \['scan_layers'\]"):
    reproduce.check_run_config(run, reproduce.training_config(spec))
