"""What `train` and `evaluate` share: the config checked at the boundary, then model, task,
SVD factors and the prompt encoder built from it."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import jax
import numpy as np

import t2jax
from t2jax import adapters, distributed, lora, rl, sharding, svf, targets
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
  try:
    llama.scan_enabled(cfg.get("scan_layers", "auto"))
  except ValueError as e:
    raise ConfigValueError(f"config.{e}") from None
  adapter, objective = cfg.get("adapter", "svf"), cfg.get("objective", "rl")
  if adapter not in adapters.ADAPTERS:
    raise ConfigValueError(f"config.adapter must be one of {adapters.ADAPTERS}; got {adapter!r}.")
  if objective not in rl.OBJECTIVES:
    raise ConfigValueError(f"config.objective must be one of {rl.OBJECTIVES}; got "
                           f"{objective!r}.")
  if adapter == "lora":
    try:
      lora.check_settings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    except ValueError as e:
      raise ConfigValueError(f"config.lora_*: {e}") from None
  if objective == "sft":
    return  # no sampling: the RL keys below do not apply
  if cfg.baseline == "leave_one_out" and cfg.samples_per_prompt < 2:
    raise ConfigValueError("config.baseline='leave_one_out' needs config.samples_per_prompt >= 2 "
                           "(or use baseline 'none' / 'batch_mean').")
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
  lora_on = cfg.get("adapter", "svf") == "lora"
  return rl.RLSettings(baseline=cfg.baseline, kl=cfg.kl, kl_coef=float(cfg.kl_coef),
                       logprob_norm=cfg.logprob_norm, parametrisation=cfg.parametrisation,
                       max_mult=float(cfg.max_mult), remat=bool(cfg.remat),
                       adapter=cfg.get("adapter", "svf"), objective=cfg.get("objective", "rl"),
                       lora_scale=float(cfg.lora_alpha) / int(cfg.lora_rank) if lora_on else 2.0,
                       lora_dropout=float(cfg.lora_dropout) if lora_on else 0.0)


@dataclasses.dataclass
class Setup:
  cfg: Any
  model: t2jax.Model
  task: Any
  dec: svf.Decomposition | None  # the SVD factors of an SVF run; None for LoRA
  mesh: Any = None  # set by place(): params and factors below are then on it
  params: Any = None
  factors: Any = None
  scanned: bool = False  # params, factors and z stacked over layers (config.scan_layers)

  def __post_init__(self):
    self.scanned = llama.scan_enabled(self.cfg.get("scan_layers", "auto"))
    self.params = self._layout(self.model.params) if self.params is None else self.params
    if self.factors is None and self.dec is not None:
      self.factors = self._layout(self.dec.factors)

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

  @property
  def lora(self) -> bool:
    return self.cfg.get("adapter", "svf") == "lora"

  def init_trainable(self):
    """The trainable tree a fresh run starts from (the base model exactly, unless SVF's
    init_noise), laid out as this run's params."""
    target_re, rank = targets.from_config(self.cfg)
    if self.lora:
      fresh = lora.LoRAExpert.init(self.model, targets=target_re, rank=self.cfg.lora_rank,
                                   alpha=self.cfg.lora_alpha, dropout=self.cfg.lora_dropout,
                                   seed=self.cfg.seed)
      return self.z_layout(jax.tree.map(jax.numpy.asarray, fresh.tree(self.model)))
    expert = t2jax.Expert.init(self.model, targets=target_re, rank=rank,
                               parametrisation=self.cfg.parametrisation, seed=self.cfg.seed,
                               max_mult=self.cfg.max_mult, init_noise=self.cfg.init_noise)
    return self.z_layout(expert.z_tree(self.model))

  def z_layout(self, tree):
    """A trainable tree as this run's params are laid out: stacked over layers when scanned."""
    return svf.stack_layers(tree) if self.scanned else svf.unstack_layers(tree)

  def adapted_params(self, trainable) -> dict:
    return adapters.materialise_jit(self.params, self.factors, self.z_layout(trainable),
                                    rl_settings(self.cfg))

  def expert(self, trainable, *, name: str, metrics: dict):
    """The artefact (an SVF Expert or a LoRAExpert) of a trainable tree of this run."""
    target_re, rank = targets.from_config(self.cfg)
    named = targets.hf_from_tree(svf.unstack_layers(jax.device_get(trainable)))
    if self.lora:
      return lora.LoRAExpert(
          factors=jax.tree.map(np.asarray, named), fingerprint=self.model.fingerprint,
          targets=target_re, rank=int(self.cfg.lora_rank), alpha=float(self.cfg.lora_alpha),
          dropout=float(self.cfg.lora_dropout), name=name, metrics=metrics)
    return t2jax.Expert(z=named, fingerprint=self.model.fingerprint, targets=target_re, rank=rank,
                        parametrisation=self.cfg.parametrisation, name=name,
                        max_mult=float(self.cfg.max_mult), metrics=metrics)

  def load_expert(self, path: str):
    """The trainable tree of the expert saved at `path` (checked against this run)."""
    return self.trainable_of(t2jax.load_expert(path), path)

  def trainable_of(self, saved, where: str = "the expert"):
    """The per-layer trainable tree of a saved SVF or LoRA expert of this run's kind."""
    if isinstance(saved, lora.LoRAExpert) != self.lora:
      kind = "a LoRA" if isinstance(saved, lora.LoRAExpert) else "an SVF"
      raise ConfigValueError(f"{where} is {kind} expert; this run's config.adapter is "
                             f"{self.cfg.get('adapter', 'svf')!r}.")
    return saved.tree(self.model) if self.lora else saved.z_tree(self.model)

  def references(self, records: Sequence[dict]) -> list[list[int]]:
    """sft targets: each record's reference completion (task.reference) tokenised, then the
    end-of-turn token the sampler stops at."""
    from t2jax.adapt import reference_tokens  # pylint: disable=import-outside-toplevel

    refs = reference_tokens(self.model, self.task, records)
    missing = [rec for rec, ref in zip(records, refs) if ref is None]
    if missing:
      raise ConfigValueError(
          f"config.objective='sft': {len(missing)} of {len(records)} {self.task.name} train "
          f"records have no reference completion (e.g. {missing[0].get('question', '')!r:.80});"
          " keep only records with one, or use objective 'rl'.")
    eos = self.model.eos_ids[0]
    out = [ref + [eos] for ref in refs]
    long = sum(len(r) > int(self.cfg.max_new_tokens) for r in out)
    if long:
      print(f"sft: {long} of {len(out)} references are longer than max_new_tokens="
            f"{self.cfg.max_new_tokens} and are cut there.", file=sys.stderr)
    return out


def for_expert(cfg, expert):
  """`cfg` with the adapter settings of a saved `expert` (a LoRA expert's rank, alpha and
  targets), so scoring it needs no matching config file."""
  if not isinstance(expert, lora.LoRAExpert):
    return cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.adapter, cfg.targets = "lora", expert.targets
  cfg.lora_rank, cfg.lora_alpha = expert.rank, expert.alpha
  return cfg


def prepare(cfg) -> Setup:
  check_config(cfg)
  rl_settings(cfg)  # validates baseline / kl / logprob_norm names
  task = make_task(cfg.task, cfg.task_args.to_dict() if hasattr(cfg.task_args, "to_dict")
                   else cfg.task_args)
  if cfg.get("objective", "rl") == "sft" and not hasattr(task, "reference"):
    raise ConfigValueError(f"config.objective='sft' trains on reference completions; task "
                           f"{cfg.task!r} gives none (no `reference`). Use objective 'rl'.")
  model = t2jax.load_model(cfg.model or None, dtype=cfg.dtype)
  dec = None if cfg.get("adapter", "svf") == "lora" else svf.decompose(
      model, *targets.from_config(cfg))
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
