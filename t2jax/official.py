"""Reading the z files of the official Transformer² code (SakanaAI/self-adaptive-llms).

What that code does (its files and functions):
  - svd_reinforce_hydra.main takes base_params = model.state_dict() of the HF model;
    policy/base.Policy.__init__ gives every entry whose name contains "mlp" one z of length
    min(W.shape) (bf16), in that dict's order, and also holds them as the nn.ParameterList
    `learnable_params_module_list`.
  - It saves torch.save(policy.state_dict()) as `policy_params.pt` (the default): keys
    `learnable_params_module_list.N`, N counting in state_dict order, i.e. layer by layer and,
    within a layer, in the order HF's MLP registers its projections: gate, up, down
    (Llama, Mistral and Qwen2 alike). With `save_legacy_params` it also saves
    `learnable_params.pt`: the dict {HF parameter name: z} itself.
  - utils.compose_new_params maps z with Policy.get_mask, f(z) = sigmoid(z)·max_mult
    (cfgs/policy/default.yaml: max_mult 1), to W' = U diag(s·f) Vᵀ · Σs / Σ(s·f): the
    `paper` parametrisation at full rank (svf.scaled_singular_values). The nuclear-norm
    rescale cancels max_mult, so an imported expert gives the same W' at any max_mult.
"""

from __future__ import annotations

import re

import numpy as np

from t2jax.models import llama
from t2jax.targets import DEFAULT_TARGETS, SVFError, hf_module_name, targeted

POLICY_KEY = "learnable_params_module_list.{}"
_POLICY_KEY = re.compile(r"learnable_params_module_list\.(\d+)")
_HF_KEY = re.compile(r"model\.layers\.\d+\..+\.weight")


def official_order(params: dict) -> list[tuple[str, int]]:
  """(HF parameter name, z length) of every matrix the official code adapts, in the order it
  numbers them (`learnable_params_module_list.N`)."""
  # llama.MLP_PROJ is the order HF's LlamaMLP / MistralMLP / Qwen2MLP register their
  # projections in, hence state_dict's
  found = [(layer, llama.MLP_PROJ.index(name), hf_module_name(block, name, layer), r)
           for block, name, layer, _, r in targeted(params, DEFAULT_TARGETS, None)]
  return [(hf, r) for _, _, hf, r in sorted(found)]


def read_z(path: str, params: dict) -> dict[str, np.ndarray]:
  """{HF parameter name: z [r] float32} from an official `policy_params.pt` or legacy
  `learnable_params.pt` (told apart by their keys), checked against the model's targeted
  matrices. Needs torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"reading the official expert {path} needs torch (pip install torch)."
                      ) from None
  try:
    raw = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # a missing, truncated or non-torch file
    raise SVFError(f"{path} cannot be read as a torch file ({type(e).__name__}: {e}).") from e
  if not isinstance(raw, dict) or not raw:
    raise SVFError(f"{path} holds a {type(raw).__name__}, not a dict of z vectors.")
  order = official_order(params)
  keys = [str(k) for k in raw]
  if all(_POLICY_KEY.fullmatch(k) for k in keys):
    by_name = _from_policy(path, raw, order)
  elif all(_HF_KEY.fullmatch(k) for k in keys):
    by_name = _from_legacy(path, raw, order)
  else:
    raise SVFError(f"{path}: keys {keys[:3]} are neither the official policy_params.pt "
                   f"layout ({POLICY_KEY.format('N')}) nor the legacy learnable_params.pt "
                   "one (HF parameter names such as model.layers.0.mlp.gate_proj.weight).")
  z = {}
  for name, r in order:
    v = by_name[name].detach().float().numpy()
    if v.shape != (r,):
      raise SVFError(f"{path}: the z of {name} has shape {tuple(v.shape)}; this model's matrix "
                     f"needs ({r},) (the official code keeps full rank).")
    z[name] = v
  return z


def _from_policy(path: str, raw: dict, order: list[tuple[str, int]]) -> dict:
  n = {int(_POLICY_KEY.fullmatch(k).group(1)): v for k, v in raw.items()}
  if sorted(n) != list(range(len(order))):
    raise SVFError(f"{path} holds {len(n)} z vectors (indices {min(n)}..{max(n)}); this model "
                   f"has {len(order)} MLP matrices, so it needs "
                   f"{POLICY_KEY.format(0)}..{POLICY_KEY.format(len(order) - 1)}.")
  return {name: n[i] for i, (name, _) in enumerate(order)}


def _from_legacy(path: str, raw: dict, order: list[tuple[str, int]]) -> dict:
  want = [name for name, _ in order]
  missing, extra = sorted(set(want) - set(raw)), sorted(set(raw) - set(want))
  if missing or extra:
    raise SVFError(f"{path} holds {len(raw)} z vectors; this model has {len(want)} MLP "
                   f"matrices: missing {missing[:3]}, unexpected {extra[:3]}.")
  return raw
