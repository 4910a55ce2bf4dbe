"""The model families beside GPT-2, by ``config.json``'s ``model_type``: their
config, classifier, language model and weight conversion, and the loading of a
transformers folder of any of them (``cljax.load_pretrained`` and ``cljax.load_lm``
come here for every family but GPT-2's).

Adding a family is one file in ``models/`` (its config with ``from_hf``, its two
modules, its ``*_params`` conversion of a transformers state dict) and one entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models import gpt_neox, llama


class Family(NamedTuple):
  config: type
  classifier: type
  lm: type
  params: Callable[[Mapping[str, Any], Any], dict]


FAMILIES: dict[str, Family] = {
    **{kind: Family(llama.LlamaConfig, llama.LlamaClassifier, llama.LlamaLM,
                    llama.llama_params) for kind in llama.FAMILIES},
    "gpt_neox": Family(gpt_neox.GPTNeoXConfig, gpt_neox.GPTNeoXClassifier,
                       gpt_neox.GPTNeoXLM, gpt_neox.neox_params),
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
  model = (family.classifier if head == "classifier" else family.lm)(cfg)
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
