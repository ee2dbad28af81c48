"""Tokenizer and chat template through transformers, from an HF directory or a GGUF file."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Sequence

from t2jax.cache import cache_dir



def _gguf_cache_dir(path: str) -> str:
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return os.path.join(cache_dir("tokenizers"), key.hexdigest()[:16])


def _gguf_has_tokenizer(path: str) -> bool:
  import gguf  # pylint: disable=import-outside-toplevel

  return "tokenizer.ggml.tokens" in gguf.GGUFReader(path).fields


def load_tokenizer(path: str):
  """The transformers tokenizer for a resolved model path, or None if the directory or GGUF
  file carries none.

  Building a tokenizer from GGUF metadata takes seconds, so the result is saved once under
  ~/.cache/t2jax/tokenizers and reloaded from there.
  """
  import transformers  # pylint: disable=import-outside-toplevel

  logging.getLogger("transformers").setLevel(logging.ERROR)
  if os.path.isdir(path):
    has_files = any(os.path.isfile(os.path.join(path, f)) for f in
                    ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json"))
    return transformers.AutoTokenizer.from_pretrained(path) if has_files else None
  cached = _gguf_cache_dir(path)
  if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
    return transformers.AutoTokenizer.from_pretrained(cached)
  if not _gguf_has_tokenizer(path):
    return None
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  try:
    tok.save_pretrained(cached)
  except OSError:
    pass  # a read-only home only costs the next load a few seconds
  return tok


def encode_chats(tokenizer, chats: Sequence[list[dict[str, str]]]) -> list[list[int]]:
  """Chat conversations (lists of {"role", "content"} turns) → token ids of each conversation
  followed by the assistant's generation prompt. A conversation that ends with an assistant
  turn has that turn's text prefilled: its tokens (tokenised on their own) follow the
  generation prompt, with no end of turn, and the model continues them."""
  if tokenizer is None:
    raise ValueError("this model has no tokenizer (its directory has no tokenizer files): pass "
                     "prompts as lists of token ids instead of strings.")
  if not tokenizer.chat_template:
    raise ValueError("this model's tokenizer has no chat template: pass chat_template=False "
                     "(CLI: --no-chat-template) to feed prompts as raw text.")
  out = []
  for turns in chats:
    prefill = ""
    if turns and turns[-1].get("role") == "assistant":
      turns, prefill = turns[:-1], turns[-1]["content"]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prefill:
      ids = ids + tokenizer(prefill, add_special_tokens=False)["input_ids"]
    out.append(ids)
  return out


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool) -> list[list[int]]:
  """Text prompts → token ids, each wrapped as one user turn of the chat template."""
  if chat_template:
    return encode_chats(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
  if tokenizer is None:
    raise ValueError("this model has no tokenizer (its directory has no tokenizer files): pass "
                     "prompts as lists of token ids instead of strings.")
  return [tokenizer(p)["input_ids"] for p in prompts]
