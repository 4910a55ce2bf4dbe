"""Parameter surgery and initialization: new token rows, the parameters of added
modules (LoRA, adapters, prompts, PNN columns), LoRA merged into the base weights,
random init and abstract shapes."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cljax.models.config import GPT2Config
from cljax.models.pnn import column_prefix
from cljax.models import scan

def _grown_rows(table_VD, ids, num_known: int):
  """``table_VD`` with rows ``ids`` (growing it to hold them) set to the mean of its
  first ``num_known`` rows."""
  old, dim = table_VD.shape
  size = max(old, max(ids) + 1)
  mean_D = jnp.mean(table_VD[:num_known].astype(jnp.float32), axis=0).astype(table_VD.dtype)
  if size > old:
    table_VD = jnp.concatenate([table_VD, jnp.zeros((size - old, dim), table_VD.dtype)])
  return table_VD.at[jnp.asarray(ids)].set(mean_D)


def add_token_embeddings(params, config: GPT2Config, ids, num_known: int):
  """(params, config) with token-embedding rows for new tokens ``ids``: the table
  grows to hold them (``vocab_size`` too) and each of their rows is set to the mean
  embedding of the ``num_known`` tokens before them; an untied LM head (``lm_head``)
  gains their columns the same way. No other parameter changes, so no logit over the
  other tokens changes (the LM head only gains columns)."""
  ids = [int(i) for i in ids]
  layout = config.LAYOUT
  table = _grown_rows(params[layout.embedding]["embedding"], ids, num_known)
  params = {**params, layout.embedding: {**params[layout.embedding], "embedding": table}}
  if not config.tied and layout.lm_head in params:
    kernel = _grown_rows(params[layout.lm_head]["kernel"].T, ids, num_known).T
    params = {**params, layout.lm_head: {**params[layout.lm_head], "kernel": kernel}}
  return params, config.replace(vocab_size=table.shape[0])


def is_peft(path) -> bool:
  """Whether a params path (names or jax key entries) is inside a LoRA, an adapter or
  the soft prompts."""
  names = [str(getattr(k, "key", k)) for k in path]
  return any(n.endswith("_lora") or n in ("adapter", "prompts") for n in names)


def peft_slot_of(path) -> int | None:
  """The slot a PEFT leaf belongs to (its name ends ``_<slot>``), None for the base."""
  if not is_peft(path):
    return None
  return int(str(getattr(path[-1], "key", path[-1])).rsplit("_", 1)[1])


def add_peft_params(model, params, rng: jax.Array):
  """``params`` with the LoRA / adapter / prompt / column parameters ``model``'s config
  asks for, freshly initialized (B, the adapters' up projections and the laterals are
  zero: the logits do not change; a new PNN column is a copy of the first); every
  parameter ``params`` already has is kept as it is."""
  fresh = jax.jit(functools.partial(init_params, model))(rng)

  def overlay(new, old):
    if not isinstance(new, Mapping):
      return old if old is not None else new
    old = old or {}
    return {k: overlay(v, old.get(k)) for k, v in new.items()}

  given, params = params, overlay(fresh, params)
  cfg = model.config
  if cfg.pnn_columns > 1:   # a new column starts as a copy of the first (e.g. pretrained)
    layout = cfg.LAYOUT
    base = ([layout.embedding, layout.final_norm] + ([layout.positions] if layout.positions
                                                     else [])
            + [f"{layout.block}{i}" for i in range(cfg.n_layer)])
    params = {**params, **{column_prefix(c) + n: jax.tree.map(jnp.copy, params[n])
                           for c in range(1, cfg.pnn_columns) for n in base
                           if column_prefix(c) + n not in given}}
  return params


def merge_lora(params, config: GPT2Config, slot: int | None = None):
  """(params, config) of the plain model equal to the LoRA one: each target's kernel
  gains ``alpha / r * A_s B_s`` for slot ``slot`` (None: every slot, summed as the
  forward without ``peft_slot``) and the LoRA parameters are dropped. Adapters cannot
  be merged (they are not linear): a config with them is refused."""
  if config.adapter_size or config.prompt_length:
    raise ValueError("Adapters and soft prompts are not linear updates of the base weights "
                     "and cannot be merged into them; only LoRA can.")
  if not config.lora_rank:
    return params, config
  slots = range(config.peft_slots) if slot is None else [slot]
  scale = config.lora_alpha / config.lora_rank

  def merge(tree):
    out = {}
    for name, sub in tree.items():
      if name.endswith("_lora"):
        continue
      if isinstance(sub, Mapping) and f"{name}_lora" in tree:
        lora = tree[f"{name}_lora"]
        delta = sum(lora[f"A_{s}"].astype(jnp.float32) @ lora[f"B_{s}"].astype(jnp.float32)
                    for s in slots)
        sub = {**sub, "kernel": (sub["kernel"] + scale * delta).astype(sub["kernel"].dtype)}
      out[name] = merge(sub) if isinstance(sub, Mapping) else sub
    return out

  return merge(params), config.replace(lora_rank=0, peft_slots=1)


def init_params(model, rng: jax.Array, seq_len: int = 8):
  """Randomly initialized params of ``model`` (any of the three models of
  :mod:`cljax.models.heads`; float32 unless ``param_dtype`` says). Blocks under
  ``scan_layers`` get the unscanned model's draw, stacked: the same run either way."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  cfg = model.config
  if cfg.scan_layers:
    return scan.stack_blocks(scan.per_block(model).init(rng, ids)["params"], cfg)
  return model.init(rng, ids)["params"]


def random_params(model, rng: jax.Array):
  """:func:`init_params` under ``jax.jit``, on the default device. On an accelerator
  with one process it is computed by the host's CPU, whose compiler builds the
  initializers in a fraction of a GPU compilation (18.8 s for GPT-2 small on an H100,
  3.3 s on its CPU), then moved to the default device."""
  init = jax.jit(functools.partial(init_params, model))
  if jax.default_backend() == "cpu" or jax.process_count() > 1:
    return init(rng)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = init(rng)
  return jax.device_put(params, jax.devices()[0])


def param_shapes(model):
  """``model``'s params as ShapeDtypeStructs (any of the three models), computed
  without allocating (``jax.eval_shape``)."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda r, i: model.init(r, i)["params"], jax.random.key(0), ids)


def add_method_tokens(model, params, tokenizer, tokens: tuple[str, ...]):
  """(model, params) with the method's tokens added to ``tokenizer`` (in place) and
  their embedding rows grown (the mean embedding, :func:`add_token_embeddings`)."""
  first = len(tokenizer)
  tokenizer.add_tokens(list(tokens), special_tokens=True)
  ids = tokenizer.convert_tokens_to_ids(list(tokens))
  if ids != list(range(first, first + len(tokens))):
    raise ValueError(f"The tokenizer already holds some of the tokens {list(tokens)} that "
                     f"the method adds (ids {ids}); use a tokenizer without them.")
  params, config = add_token_embeddings(params, model.config, ids, first)
  logging.info("Added tokens %s (ids %d..%d) with the mean embedding.", list(tokens), first,
               first + len(tokens) - 1)
  return model.clone(config=config), params


def add_method_modules(model, params, options: dict, rng: jax.Array):
  """(model, params) with the modules a method asks for (``model_options``: LoRA,
  adapters, prompts, PNN columns), their parameters freshly initialized from ``rng``;
  the others kept as they are."""
  model = model.clone(config=model.config.replace(**options))
  params = add_peft_params(model, params, rng)
  logging.info("Added the method's modules (%s): %d parameters.",
               ", ".join(f"{k}={v}" for k, v in options.items()),
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
  return model, params
