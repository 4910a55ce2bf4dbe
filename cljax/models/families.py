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

from cljax.models import gpt_neox, llama
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
  fresh one; a language model needs ``lm_head`` (``embed_out``) unless tied."""
  family = FAMILIES[hf_config.get("model_type")]
  extra = {"num_labels": num_labels} if head == "classifier" else {}
  cfg = family.config.from_hf(hf_config, dtype=dtype, **extra, **overrides)
  model = (GPT2Classifier if head == "classifier" else GPT2LM)(cfg)
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
  want = want["params"]
  drop = (("lm_head.", "embed_out.") if head == "classifier" else ("score.",))
  state = {k: v for k, v in state_dict.items() if not k.startswith(drop)}
  params = family.params(state, cfg)
  fresh = head == "classifier" and np.shape(params.get("score", {}).get("kernel")) != tuple(
      want["score"]["kernel"].shape)
  if fresh:
    params["score"] = {"kernel": jax.random.normal(jax.random.key(seed), want["score"][
        "kernel"].shape) * cfg.initializer_range}
  _shapes_match(params, want, folder)
  logging.info("Loaded a %s %s from %s%s.", hf_config.get("model_type"), head, folder,
               " (fresh classification head)" if fresh else "")
  return model, params


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
