"""What `train` and `evaluate` share: the config checked at the boundary, then model, task,
SVD factors and the prompt encoder built from it."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import jax
import numpy as np

import t2jax
from t2jax import distributed, rl, sharding, svf, targets
from t2jax.models import llama
from t2jax.tasks import make_task
from t2jax.tokenizer import encode_chats


class ConfigValueError(ValueError):
  """A config value out of range; the message names the key."""


def check_config(cfg) -> None:
  positive = ("steps", "batch_size", "samples_per_prompt", "max_new_tokens", "eval_batch_size",
              "checkpoint_every", "microbatches")
  for key in positive:
    if int(cfg[key]) < 1:
      raise ConfigValueError(f"config.{key} must be >= 1; got {cfg[key]}.")
  for key in ("eval_every", "eval_size", "test_size", "warmup_steps"):
    if int(cfg[key]) < 0:
      raise ConfigValueError(f"config.{key} must be >= 0; got {cfg[key]}.")
  if cfg.batch_size % cfg.microbatches:
    raise ConfigValueError(f"config.microbatches={cfg.microbatches} must divide "
                           f"config.batch_size={cfg.batch_size}.")
  if cfg.temperature < 0:
    raise ConfigValueError(f"config.temperature must be >= 0 (0 = greedy); got {cfg.temperature}.")
  if cfg.lr <= 0:
    raise ConfigValueError(f"config.lr must be > 0; got {cfg.lr}.")
  if cfg.baseline == "leave_one_out" and cfg.samples_per_prompt < 2:
    raise ConfigValueError("config.baseline='leave_one_out' needs config.samples_per_prompt >= 2 "
                           "(or use baseline 'none' / 'batch_mean').")
  try:
    llama.scan_enabled(cfg.get("scan_layers", "auto"))
  except ValueError as e:
    raise ConfigValueError(f"config.{e}") from None
  if cfg.samples_per_prompt > 1 and cfg.temperature == 0:
    raise ConfigValueError("config.samples_per_prompt > 1 with temperature 0 draws identical "
                           "samples; set config.temperature > 0 or samples_per_prompt=1.")


def eval_subset(records, size: int) -> list:
  """`size` records (0 = all) drawn evenly: splits are stored in a sorted order (arithmetic by
  operand), so the first N would be a biased sample. Fixed seed: every run scores the same."""
  records = list(records)
  if not size or size >= len(records):
    return records
  keep = np.sort(np.random.default_rng(0).permutation(len(records))[:size])
  return [records[i] for i in keep]


def rl_settings(cfg) -> rl.RLSettings:
  return rl.RLSettings(baseline=cfg.baseline, kl=cfg.kl, kl_coef=float(cfg.kl_coef),
                       logprob_norm=cfg.logprob_norm, parametrisation=cfg.parametrisation,
                       max_mult=float(cfg.max_mult), remat=bool(cfg.remat))


@dataclasses.dataclass
class Setup:
  cfg: Any
  model: t2jax.Model
  task: Any
  dec: svf.Decomposition
  mesh: Any = None  # set by place(): params and factors below are then on it
  params: Any = None
  factors: Any = None
  scanned: bool = False  # params, factors and z stacked over layers (config.scan_layers)

  def __post_init__(self):
    self.scanned = llama.scan_enabled(self.cfg.get("scan_layers", "auto"))
    self.params = self._layout(self.model.params) if self.params is None else self.params
    self.factors = self._layout(self.dec.factors) if self.factors is None else self.factors

  def _layout(self, tree):
    """params or factors as the run's layers want them: stacked when scanned (a copy)."""
    if not self.scanned:
      return tree
    return llama.stack_layers(tree) if isinstance(tree, dict) else svf.stack_layers(tree)

  def place(self, mesh) -> None:
    """Puts params and SVD factors on `mesh` by the partition rules."""
    self.mesh = mesh
    place = lambda tree: jax.device_put(tree, sharding.tree_shardings(tree, mesh))
    self.params, self.factors = place(self.params), place(self.factors)

  def encode(self, records: Sequence[dict]) -> list[list[int]]:
    prompts = encode_chats(self.model.tokenizer, [self.task.messages(r) for r in records])
    limit = self.model.config.max_length - int(self.cfg.max_new_tokens)
    for rec, p in zip(records, prompts):
      if len(p) > limit:
        raise ConfigValueError(f"a {self.task.name} prompt has {len(p)} tokens; with "
                               f"max_new_tokens={self.cfg.max_new_tokens} the model allows "
                               f"{limit}: {rec.get('question', rec)!r:.80}")
    return prompts

  def init_z(self) -> list:
    target_re, rank = targets.from_config(self.cfg)
    expert = t2jax.Expert.init(self.model, targets=target_re, rank=rank,
                               parametrisation=self.cfg.parametrisation, seed=self.cfg.seed,
                               max_mult=self.cfg.max_mult, init_noise=self.cfg.init_noise)
    return self.z_layout(expert.z_tree(self.model))

  def z_layout(self, z_tree):
    """A z tree as this run's params are laid out: stacked over layers when scanned."""
    return svf.stack_layers(z_tree) if self.scanned else svf.unstack_layers(z_tree)

  def adapted_params(self, z_tree: list) -> dict:
    return svf.materialise_jit(self.params, self.factors, self.z_layout(z_tree),
                               parametrisation=self.cfg.parametrisation,
                               max_mult=float(self.cfg.max_mult))

  def expert(self, z_tree, *, name: str, metrics: dict) -> t2jax.Expert:
    """An Expert artefact from a z tree of this run."""
    target_re, rank = targets.from_config(self.cfg)
    z = targets.hf_from_tree(svf.unstack_layers(jax.device_get(z_tree)))
    return t2jax.Expert(z=z, fingerprint=self.model.fingerprint, targets=target_re, rank=rank,
                        parametrisation=self.cfg.parametrisation, name=name,
                        max_mult=float(self.cfg.max_mult), metrics=metrics)


def prepare(cfg) -> Setup:
  check_config(cfg)
  rl_settings(cfg)  # validates baseline / kl / logprob_norm names
  task = make_task(cfg.task, cfg.task_args.to_dict() if hasattr(cfg.task_args, "to_dict")
                   else cfg.task_args)
  model = t2jax.load_model(cfg.model or None, dtype=cfg.dtype)
  dec = svf.decompose(model, *targets.from_config(cfg))
  return Setup(cfg=cfg, model=model, task=task, dec=dec)


def config_load_error(e: BaseException) -> str:
  """One line saying why the command line's config did not load (ml_collections runs the
  config file and applies the --config.KEY overrides while absl parses the flags)."""
  if isinstance(e, SyntaxError):
    return f"{e.filename}:{e.lineno}: the config file is not valid Python ({e.msg})."
  if isinstance(e, (AttributeError, KeyError)):
    return (f"an override names a key the config does not have: {e}; see the config file's "
            "get_config() for its keys.")
  text = " ".join(str(e).split())
  if isinstance(e, OSError):  # the file is missing or unreadable
    return f"the config file could not be read: {text}"
  return f"the config file's get_config() failed: {type(e).__name__}: {text}"


def run_cli(body, argv=None, errors: tuple = (ValueError, FileNotFoundError)) -> int:
  """absl's app.run around body(FLAGS) for the entry points: joins the multi-process runtime
  when launched as one of several, INFO logs off (orbax logs every save at INFO), and a user
  error printed as one `error: ...` line with exit status 2 (a config file that does not load
  too: absl turns only its own flag errors into a message)."""
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel

  def parse(args):
    try:
      rest = flags.FLAGS(args)
      for value in flags.FLAGS.flag_values_dict().values():
        # a config file that is missing loads "lazily" into a stand-in that raises on first use
        if type(value).__name__ == "_ErrorConfig":
          raise value._error  # pylint: disable=protected-access
      return rest
    except flags.Error as e:  # absl's own: a bad value, an unknown flag, get_config() raising
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      # a get_config() that raised comes as a whole traceback: its first and last lines say it
      message = lines[0] + (f" {lines[-1]}" if "Traceback" in str(e) else "")
      print(f"error: {message}", file=sys.stderr)
    except Exception as e:  # pylint: disable=broad-except
      print(f"error: {config_load_error(e)}", file=sys.stderr)
    sys.exit(2)

  def run(_):
    logging.set_verbosity(logging.WARNING)
    try:
      distributed.initialize()
      body(flags.FLAGS)
    except (*errors, distributed.DistributedError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(run, argv=argv, flags_parser=parse)
  return 0
