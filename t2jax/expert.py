"""`Expert`: a portable SVF expert — z (one vector per targeted matrix, keyed by HF parameter
name) plus the metadata that ties it to one model, target set, rank and parametrisation."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import atomic, lora, official, svf
from t2jax.targets import (DEFAULT_TARGETS, SVFError, check_rank, hf_module_name, resolve,
                           targeted, tree_from_hf)

FORMAT = "t2jax-expert/1"
_META, _Z = "expert.json", "z.safetensors"


@dataclasses.dataclass(frozen=True, eq=False)
class Expert:
  z: dict[str, np.ndarray]  # "model.layers.0.mlp.gate_proj.weight" → [r]
  fingerprint: str  # Model.fingerprint of the model it was made for
  targets: str  # regex over "layers/<block>/<name>" that chose the matrices
  rank: int | None  # None = full rank (the paper's SVF)
  parametrisation: str = "scale"  # scale | paper
  name: str = "expert"
  max_mult: float = 2.0  # paper parametrisation: f(z) = sigmoid(z) · max_mult
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

  # -- construction ---------------------------------------------------------------------------

  @classmethod
  def init(cls, model, *, targets: str | None = None, rank: int | None = None,
           parametrisation: str = "scale", seed: int = 0, name: str = "expert",
           max_mult: float = 2.0, init_noise: float = 0.0) -> "Expert":
    """A fresh expert, the base model exactly unless init_noise > 0 (the official code's
    `paper` init uses init_noise=0.01; see svf.init_z)."""
    targets, rank = resolve(targets), check_rank(rank)
    rng = np.random.default_rng(seed)
    z = {hf_module_name(block, proj, layer): svf.init_z((r,), parametrisation, rng, init_noise)
         for block, proj, layer, _, r in targeted(model.params, targets, rank)}
    return cls(z=z, fingerprint=model.fingerprint, targets=targets, rank=rank,
               parametrisation=parametrisation, name=name, max_mult=max_mult)

  @staticmethod
  def mix(experts: Sequence["Expert"], weights: Sequence[float],
          name: str = "mixture") -> "Expert":
    """z = Σ_k w_k z_k over raw z (as the official code mixes, before any sigmoid). The
    weights must lie on the simplex (w ≥ 0, Σw = 1): with `scale` experts (z ≈ 1), Σw = 3
    would triple every targeted weight; t2jax.adapt.simplex projects any α there."""
    experts = list(experts)
    if not experts or len(experts) != len(weights):
      raise SVFError(f"mix needs one weight per expert; got {len(experts)} experts and "
                     f"{len(weights)} weights.")
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
      raise SVFError(f"mixture weights must be >= 0 and sum to 1 (the model's scale); got "
                     f"{w.tolist()}. Project them with t2jax.adapt.simplex.")
    first = experts[0]
    for e in experts[1:]:
      first.check_same_space(e)
    z = {k: sum(float(w) * e.z[k] for e, w in zip(experts, weights)).astype(np.float32)
         for k in first.z}
    return dataclasses.replace(first, z=z, name=name, metrics={
        "mixture": {e.name: float(w) for e, w in zip(experts, weights)}})

  # -- compatibility --------------------------------------------------------------------------

  def check_same_space(self, other: "Expert") -> None:
    mine = (self.fingerprint, self.targets, self.rank, self.parametrisation, self.max_mult)
    theirs = (other.fingerprint, other.targets, other.rank, other.parametrisation,
              other.max_mult)
    if mine != theirs:
      raise SVFError(f"experts {self.name!r} and {other.name!r} live in different SVF spaces "
                     f"(fingerprint, targets, rank, parametrisation, max_mult): {mine} vs "
                     f"{theirs}.")

  def check(self, model) -> None:
    """Raises SVFError saying exactly why this expert does not fit `model`."""
    if self.fingerprint != model.fingerprint:
      raise SVFError(f"expert {self.name!r} was made for model {self.fingerprint}, not for "
                     f"{model.source} (fingerprint {model.fingerprint}).")
    expected = Expert.init(model, targets=self.targets, rank=self.rank).z
    missing = sorted(set(expected) - set(self.z))
    extra = sorted(set(self.z) - set(expected))
    if missing or extra:
      raise SVFError(f"expert {self.name!r} does not cover targets {self.targets!r}: missing "
                     f"{missing[:3]}, unexpected {extra[:3]}.")
    for k, v in expected.items():
      if self.z[k].shape != v.shape:
        raise SVFError(f"expert {self.name!r}: z[{k!r}] has shape {self.z[k].shape}; rank "
                       f"{self.rank} on this model needs {v.shape}.")

  def z_tree(self, model) -> list:
    """z as [{block: {name: [r]}} per layer] (the layout of params["layers"]), checked
    against model."""
    self.check(model)
    return tree_from_hf(self.z, model.params, self.targets)

  # -- files ----------------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """A directory with expert.json + z.safetensors. Written beside `path`, then swapped in,
    so an existing expert at `path` is replaced only by a complete new one."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    with atomic.write_dir(path) as tmp:
      save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.z.items()},
                os.path.join(tmp, _Z))
      meta = {"format": FORMAT, "name": self.name, "fingerprint": self.fingerprint,
              "targets": self.targets, "rank": self.rank,
              "parametrisation": self.parametrisation, "max_mult": self.max_mult,
              "metrics": self.metrics}
      with open(os.path.join(tmp, _META), "w") as f:
        json.dump(meta, f, indent=1, default=float)

  @classmethod
  def load(cls, path: str) -> "Expert":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    meta_path, z_path = os.path.join(path, _META), os.path.join(path, _Z)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{path} is not an expert directory (needs {_META} and {_Z}).")
    with reading(meta_path), open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      hint = (" (a LoRA expert: load it with t2jax.load_expert)"
              if meta.get("format") == lora.FORMAT else "")
      raise SVFError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}{hint}.")
    if not os.path.isfile(z_path):
      raise FileNotFoundError(f"{path} is not an expert directory (needs {_META} and {_Z}).")
    with reading(z_path):
      z = dict(load_file(z_path))
    return cls(z=z, fingerprint=meta["fingerprint"],
               targets=meta["targets"], rank=meta["rank"],
               parametrisation=meta["parametrisation"], name=meta["name"],
               max_mult=meta["max_mult"], metrics=meta.get("metrics", {}))

  @classmethod
  def from_official(cls, path: str, model, *, name: str | None = None,
                    max_mult: float = 2.0) -> "Expert":
    """Imports an expert saved by the official Transformer² code: its default
    `policy_params.pt` or the legacy `learnable_params.pt` (t2jax.official says how each
    numbers z). `paper` parametrisation, full-rank MLP targets; max_mult cancels in its
    nuclear-norm rescale, so 2.0 (t2jax's) gives the official W' and mixes with t2jax
    experts. Needs torch."""
    z = official.read_z(path, model.params)
    expert = cls(z=z, fingerprint=model.fingerprint, targets=DEFAULT_TARGETS, rank=None,
                 parametrisation="paper", name=name or os.path.basename(path),
                 max_mult=max_mult)
    expert.check(model)
    return expert


def load_any(path: str) -> "Expert | lora.LoRAExpert":
  """The expert saved at `path`: an SVF Expert or a LoRA expert, as its expert.json says."""
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{path} is not an expert directory (no {_META}).")
  with reading(meta_path), open(meta_path, encoding="utf-8") as f:
    kind = json.load(f).get("format")
  if kind == lora.FORMAT:
    return lora.LoRAExpert.load(path)
  return Expert.load(path)


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
  """Errors while reading `path` name it: a copy or save cut short leaves a truncated file."""
  try:
    yield
  except Exception as e:  # json, safetensors and OS errors alike
    raise SVFError(f"{path} cannot be read ({type(e).__name__}: {e}); the expert is damaged or "
                   "incomplete: copy or save it again.") from e


# ---------------------------------------------------------------------------------------------
# Binding experts to a batch: which params, adapters and projection the forward pass uses.

_MATERIALISED_KEPT = 2  # materialised experts memoised per model (each costs the targets' size)


def _digest(arrays: dict) -> str:
  """A content hash of {name: array or {part: array}} (an expert's z or LoRA factors)."""
  h = hashlib.sha256()
  for path, x in sorted(jax.tree_util.tree_flatten_with_path(arrays)[0], key=lambda t: str(t[0])):
    h.update(str(path).encode() + np.ascontiguousarray(x, np.float32).tobytes())
  return h.hexdigest()


def _materialised(model, expert: Expert, dec: svf.Decomposition) -> dict:
  key = ("materialised", expert.targets, expert.rank, expert.parametrisation, expert.max_mult,
         _digest(expert.z))
  memo = model.cache.setdefault("materialised", collections.OrderedDict())
  if key not in memo:
    memo[key] = svf.materialise_jit(model.params, dec.factors, expert.z_tree(model),
                             parametrisation=expert.parametrisation, max_mult=expert.max_mult)
    while len(memo) > _MATERIALISED_KEPT:
      memo.popitem(last=False)
  memo.move_to_end(key)
  return memo[key]


def _merged_lora(model, expert: lora.LoRAExpert) -> dict:
  key = ("lora", expert.scale, _digest(expert.factors))
  memo = model.cache.setdefault("materialised", collections.OrderedDict())
  if key not in memo:
    memo[key] = lora.merged_params(model, expert)
    while len(memo) > _MATERIALISED_KEPT:
      memo.popitem(last=False)
  memo.move_to_end(key)
  return memo[key]


def bind(model, experts, batch: int, mode: str = "auto"):
  """experts: None, one Expert (or LoRA expert) for all rows, or a list of Expert-or-None per
  row.
  Returns (params, adapters, mode) for llama.forward / the sampler: params the base or a
  materialised expert's, adapters None or an svf.RowAdapters (a z per row, factored), and the
  mode used ("base", "materialised" or "factored")."""
  if experts is None:
    return model.params, None, "base"
  if isinstance(experts, lora.LoRAExpert):  # merged once: K + alpha/r·A B
    return _merged_lora(model, experts), None, "materialised"
  rows = [experts] * batch if isinstance(experts, Expert) else list(experts)
  if len(rows) != batch:
    raise SVFError(f"experts has {len(rows)} entries for {batch} prompts; give one Expert for "
                   "the whole batch or one Expert-or-None per prompt.")
  present = [e for e in rows if e is not None]
  if any(isinstance(e, lora.LoRAExpert) for e in present):
    raise SVFError("a LoRA expert runs merged into the weights, one for the whole batch; a "
                   "different expert per row needs SVF experts.")
  if any(not isinstance(e, Expert) for e in present):
    raise TypeError("experts must be t2jax.Expert objects (or None per row).")
  if not present:
    return model.params, None, "base"
  first = present[0]
  for e in present[1:]:
    first.check_same_space(e)
  first.check(model)
  shared = len(present) == batch and all(e is first for e in present)
  mode = svf.choose_mode(per_row=not shared, mode=mode)
  dec = svf.decompose(model, first.targets, first.rank)
  if mode == "materialised":
    if not shared:
      raise SVFError("SVF mode 'materialised' needs one expert for the whole batch; rows with "
                     "different experts (or none) need mode 'factored' or 'auto'.")
    return _materialised(model, first, dec), None, mode
  trees = {id(e): e.z_tree(model) for e in present}
  ones = jax.tree.map(np.ones_like, trees[id(first)])  # placeholder rows, off in rows_on
  z_rows = jax.tree.map(lambda *per_row: jnp.asarray(np.stack(per_row)),  # [B, r] per matrix
                        *[trees[id(e)] if e is not None else ones for e in rows])
  adapters = svf.RowAdapters(factors=dec.factors, z_rows=z_rows,
                             rows_on=jnp.asarray([e is not None for e in rows]),
                             parametrisation=first.parametrisation, max_mult=first.max_mult)
  return model.params, adapters, mode
