"""The model families beside GPT-2, by ``config.json``'s ``model_type``: their
config, classifier, language model and weight conversion, and the loading of a
transformers folder of any of them (``cljax.load_pretrained`` and ``cljax.load_lm``
come here for every family but GPT-2's).

Adding a family is one file in ``models/`` (its config, a :class:`TrunkOptions` with
its :class:`Layout` and ``from_hf``; its block, embedding and final norm as a
:class:`Trunk`; its ``*_params`` conversion of a transformers state dict), one entry
in :data:`FAMILIES` and one in ``heads.TRUNKS``. The classifier, label words, LM,
generation and every method then work on it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models import gpt_neox, llama, scan
from cljax.models.heads import GPT2Classifier, GPT2LM


class Family(NamedTuple):
  config: type
  params: Callable[[Mapping[str, Any], Any], dict]   # a transformers state dict -> params
  prefix: str                  # the trunk's prefix in transformers' names
  heads: tuple[str, ...]       # the top-level params outside the trunk
  norm_leaf: str               # a norm's scale in the params (transformers: "weight")


FAMILIES: dict[str, Family] = {
    **{kind: Family(llama.LlamaConfig, llama.llama_params, "model.", ("lm_head", "score"),
                    "weight") for kind in llama.FAMILIES},
    "gpt_neox": Family(gpt_neox.GPTNeoXConfig, gpt_neox.neox_params, "gpt_neox.",
                       ("embed_out", "score"), "scale"),
}
SUPPORTED = ("gpt2",) + tuple(FAMILIES)

# Random-init shapes beside GPT-2's (config.SIZES): tiny and mini for every family, and
# the shapes of real small models (their config.json's numbers), so a run or a
# benchmark can time them without their weights. A real shape names its family.
_TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=1024)
_MINI = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, max_position_embeddings=1024)
ARCH_SIZES: dict[str, dict[str, Any]] = {
    "tiny": _TINY, "mini": _MINI,
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192,
                                       "rope_theta": 500000.0}),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5),
    "pythia-160m": dict(model_type="gpt_neox", hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, vocab_size=50304,
                        max_position_embeddings=2048, rotary_pct=0.25),
    "pythia-410m": dict(model_type="gpt_neox", hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=16, vocab_size=50304,
                        max_position_embeddings=2048, rotary_pct=0.25),
}
# GQA in the small Llama shapes too: 2 key-value heads of 4.
_KV = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gpt_neox": None}


def arch_sizes(arch: str) -> list[str]:
  """The ``--size`` values a random init of ``arch`` takes."""
  return ["tiny", "mini"] + [n for n, s in ARCH_SIZES.items()
                             if s.get("model_type") == arch]


def random_config(arch: str, size: str, **overrides):
  """The config of a random init of family ``arch`` (a ``model_type`` other than
  gpt2) at ``size`` (:func:`arch_sizes`), with ``overrides`` (config fields; ``vocab_size``
  and ``max_position_embeddings`` as given)."""
  check_supported(arch)
  if size not in arch_sizes(arch):
    raise ValueError(f"--size={size!r} for --arch={arch}: expected one of "
                     f"{', '.join(arch_sizes(arch))}.")
  shape = dict(ARCH_SIZES[size])
  if size in ("tiny", "mini") and _KV[arch]:
    shape["num_key_value_heads"] = _KV[arch]
  return FAMILIES[arch].config.from_hf({**shape, "model_type": arch}, **overrides)


def check_supported(model_type: str | None) -> None:
  """A one-line error for a ``model_type`` no family here implements."""
  if model_type not in SUPPORTED:
    raise ValueError(f"config.json has model_type={model_type!r}; cljax implements "
                     f"{', '.join(SUPPORTED)}.")


def _shapes_match(params, want, folder: str) -> None:
  """Every parameter the module has, at its shape, and nothing else: or one error
  that lists the differences."""
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(
      params)[0]}
  need = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  problems = ([f"missing {k}" for k in sorted(set(need) - set(got))]
              + [f"unexpected {k}" for k in sorted(set(got) - set(need))]
              + [f"{k}: {got[k]} in the checkpoint, {need[k]} in the model"
                 for k in sorted(set(got) & set(need)) if got[k] != need[k]])
  if problems:
    raise ValueError(f"{folder}: the weights do not match the config: " + "; ".join(problems))


def load(hf_config: Mapping, state_dict: Mapping[str, np.ndarray], folder: str, *,
         head: str, num_labels: int = 2, dtype: str = "float32", seed: int = 0,
         **overrides):
  """(model, params) of ``head`` ("classifier" or "lm") for a family's checkpoint:
  a classifier keeps the checkpoint's ``score`` when its shape fits, else draws a
  fresh one, and its LM head only where the config asks (``classifier_lm_head``); a
  language model needs ``lm_head`` (``embed_out``) unless tied."""
  family = FAMILIES[hf_config.get("model_type")]
  extra = {"num_labels": num_labels} if head == "classifier" else {}
  cfg = family.config.from_hf(hf_config, dtype=dtype, **extra, **overrides)
  model = (GPT2Classifier if head == "classifier" else GPT2LM)(cfg)
  per_block = scan.per_block(model)   # Hugging Face's layout
  want = jax.eval_shape(lambda: per_block.init(jax.random.key(0),
                                               jnp.zeros((1, 2), jnp.int32)))
  want = want["params"]
  drop = (("score.",) if head != "classifier" else () if cfg.classifier_lm_head
          else ("lm_head.", "embed_out."))
  state = {k: v for k, v in state_dict.items() if not k.startswith(drop)}
  params = family.params(state, cfg)
  fresh = head == "classifier" and np.shape(params.get("score", {}).get("kernel")) != tuple(
      want["score"]["kernel"].shape)
  if fresh:
    params["score"] = {"kernel": jax.random.normal(jax.random.key(seed), want["score"][
        "kernel"].shape) * cfg.initializer_range}
  lm_head = cfg.LAYOUT.lm_head
  fresh_lm = lm_head in want and lm_head not in params   # a classification checkpoint
  if fresh_lm:
    params[lm_head] = {"kernel": jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1),
                                                   want[lm_head]["kernel"].shape)
                       * cfg.initializer_range}
  _shapes_match(params, want, folder)
  logging.info("Loaded a %s %s from %s%s%s.", hf_config.get("model_type"), head, folder,
               " (fresh classification head)" if fresh else "",
               f" (fresh {lm_head}: the checkpoint has no LM head)" if fresh_lm else "")
  return model, scan.as_layout(params, cfg)


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------

def hf_config(cfg, head: str) -> dict:
  """A transformers ``config.json`` of a family's config, for ``head`` ("score" or
  "lm")."""
  out = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ("dtype", "param_dtype", "rope_scaling", "rope_theta", "qk_norm",
                      "num_labels", "partial_rotary_factor") and v is not None}
  kind = getattr(cfg, "model_type", "gpt_neox")
  rope = {"rope_type": "default", **dict(getattr(cfg, "rope_scaling", ())),
          "rope_theta": cfg.rope_theta}
  if kind == "gpt_neox":
    rope["partial_rotary_factor"] = cfg.partial_rotary_factor
  names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
           "gpt_neox": "GPTNeoX"}
  top = "ForSequenceClassification" if head == "score" else "ForCausalLM"
  return {**out, "model_type": kind, "rope_parameters": rope,
          "architectures": [names[kind] + top],
          "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}}


def state_dict(params, cfg) -> dict[str, np.ndarray]:
  """transformers' tensors of a family's params: names with the trunk's prefix,
  kernels transposed back to ``[out, in]``."""
  family = FAMILIES[getattr(cfg, "model_type", "gpt_neox")]
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    array = np.asarray(jax.device_get(value), np.float32)
    if keys[-1] == "kernel":
      keys[-1], array = "weight", array.T
    elif keys[-1] in ("embedding", family.norm_leaf):
      keys[-1] = "weight"
    if keys[0].startswith("layers_"):
      keys = ["layers", keys[0].split("_")[1]] + keys[1:]
    name = ".".join(keys)
    out[name if keys[0] in family.heads else family.prefix + name] = np.ascontiguousarray(
        array)
  return out


def save(params, cfg, folder: str, head: str) -> None:
  """``config.json`` and ``model.safetensors`` (float32) of a family's params: a
  folder transformers loads with the same logits."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if head == "score" and "score" not in params:
    raise ValueError("head='score' but the params have no score head; export with head='lm'.")
  kept = {k: v for k, v in params.items() if head == "score" or k != "score"}
  os.makedirs(folder, exist_ok=True)
  save_file(state_dict(kept, cfg), os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config(cfg, head), f, indent=2)
