"""t2jax: Transformer² (self-adaptive LLMs with SVF experts) in JAX."""

from t2jax.expert import Expert
from t2jax.expert import load_any as load_expert
from t2jax.generation import Generation, generate
from t2jax.model import Model, load_model
from t2jax.models.config import ConfigError, ModelConfig
from t2jax.lora import LoRAExpert
from t2jax.weights import WeightsError

__all__ = ["ConfigError", "Expert", "Generation", "LoRAExpert", "Model", "ModelConfig",
           "WeightsError", "generate", "load_expert", "load_model"]
