"""The three models over any family's trunk: the classifier (a ``score`` head at the
pooled token), classification as text (label-word logits of the LM head) and the
language model (the LM head over every position, with the KV cache for generation);
the optional inputs they take, declared once. The family is the config's class:
GPT-2 (:mod:`cljax.models.gpt2`), the Llama family (:mod:`cljax.models.llama`),
GPT-NeoX (:mod:`cljax.models.gpt_neox`), each giving its :class:`Trunk`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cljax.models import gpt2, gpt_neox, llama, scan
from cljax.models.config import GPT2Config
from cljax.models.kv_cache import KVCache, LayerCache
from cljax.models.layers import Trunk, dense, pool_index
from cljax.models.peft import Prompts
from cljax.models.pnn import columns_hidden

TRUNKS = {GPT2Config: gpt2.TRUNK, llama.LlamaConfig: llama.TRUNK,
          gpt_neox.GPTNeoXConfig: gpt_neox.TRUNK}


def trunk_of(cfg) -> Trunk:
  """The :class:`Trunk` of a config's family."""
  return TRUNKS[type(cfg)]


def block_class(cfg, remat: bool):
  """The family's block, rematerialized in the backward pass where ``remat``."""
  block = trunk_of(cfg).block
  return nn.remat(block, static_argnums=(3,)) if remat else block


def lm_logits(cfg, embed, h, prefix: str = ""):
  """The LM head's float32 logits of ``h``: the token embedding ``embed`` where the
  config ties them (GPT-2), else the family's bias-free ``lm_head``."""
  if cfg.tied:
    return embed.attend(h).astype(jnp.float32)
  return dense(cfg.vocab_size, cfg, prefix + cfg.LAYOUT.lm_head, False)(h).astype(jnp.float32)


# The optional inputs a batch may carry into the models (set by methods: the per-task
# modules' slot, the progressive prompts in use, the LM positions whose logits a loss
# reads, DEN's MLP units and token rows in use); the steps pass exactly these keys of a batch on to
# ``model.apply``.
MODEL_INPUTS = ("peft_slot", "prompt_active", "logits_index", "den_units", "den_rows")

def pooled_hidden(cfg, input_ids, attention_mask, deterministic: bool,
                   peft_slot=None, prompt_active=None, den_units=None, den_rows=None):
  """(the token embedding module, the final hidden state at the pooled token ``[B, D]``).
  Called inside a model's compact ``__call__`` (its parameters are that model's);
  ``den_units [B, L, W]``: the MLP units each example uses in each block, ``den_rows
  [B, T]`` each token's embedding row (DEN)."""
  B, T = input_ids.shape
  if T > cfg.n_positions:
    raise ValueError(f"Sequence length {T} exceeds n_positions={cfg.n_positions}.")
  trunk = trunk_of(cfg)
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  wte, x_BTD = trunk.embed(cfg, input_ids, jnp.arange(T)[None], deterministic,
                           rows_BT=den_rows)
  block_cls = block_class(cfg, cfg.remat)
  # Only the pooled token reaches the head: the last block computes its query,
  # attention output and MLP at that position alone (exactly, with less work).
  idx_B = pool_index(input_ids, cfg.pad_token_id)
  if cfg.prompt_length:
    prefix_BPD, prefix_mask_BP = Prompts(cfg, name="prompts")(B, prompt_active)
    x_BTD = jnp.concatenate([prefix_BPD.astype(x_BTD.dtype), x_BTD], axis=1)
    real_BT = (jnp.ones((B, T), jnp.int32) if attention_mask is None
               else attention_mask.astype(jnp.int32))
    attention_mask = jnp.concatenate([prefix_mask_BP, real_BT], axis=1)
    idx_B = idx_B + prefix_BPD.shape[1]
    # Rotary families: the prompts sit at positions -P..-1 before the input's 0..T-1,
    # so with no prompt in use every logit is the base model's.
    P = prefix_BPD.shape[1]
    positions_BT = jnp.concatenate([jnp.broadcast_to(jnp.arange(-P, 0), (B, P)),
                                    positions_BT], axis=1)
  if cfg.pnn_columns > 1:
    return wte, columns_hidden(cfg, trunk, input_ids, x_BTD, attention_mask, deterministic,
                               idx_B, peft_slot, positions_BT)
  if cfg.scan_layers:
    x_BTD = scan.scanned_blocks(block_cls, cfg, x_BTD, attention_mask, deterministic,
                                peft_slot, positions_BT)
    x_BTD = jnp.take_along_axis(x_BTD, idx_B[:, None, None], axis=1)
  for i in range(0 if cfg.scan_layers else cfg.n_layer):
    last = i == cfg.n_layer - 1
    x_BTD = block_cls(cfg, name=f"{cfg.LAYOUT.block}{i}")(
        x_BTD, attention_mask, deterministic, idx_B if last else None, None, peft_slot,
        None if den_units is None else den_units[:, i], positions_BT)
  return wte, trunk.final_norm(cfg, cfg.LAYOUT.final_norm)(x_BTD[:, 0])



class GPT2Classifier(nn.Module):
  """A trunk (GPT-2's or any family's, by its config) with a bias-free linear
  ``score`` head at the pooled token: transformers' ``*ForSequenceClassification``.

  Call: ``model.apply({"params": params}, input_ids, attention_mask=None,
  deterministic=True)`` -> float32 logits ``[batch, num_labels]``. Dropout needs
  ``deterministic=False`` and ``rngs={"dropout": key}``. With LoRA or adapters in the
  config, ``peft_slot [B]`` (int) picks each example's slot (None: their sum); with
  soft prompts, ``prompt_active [B, S]`` (bool) the prompts in front of each example;
  with DEN's capacity (``den_capacity``, ``den_rows``), ``den_units [B, L, W]`` the MLP
  units in use and ``den_rows [B, T]`` each token's embedding row.
  """

  config: GPT2Config   # or LlamaConfig, GPTNeoXConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True,
               peft_slot=None, prompt_active=None, den_units=None, den_rows=None):
    _, x_BD = pooled_hidden(self.config, input_ids, attention_mask, deterministic,
                             peft_slot, prompt_active, den_units, den_rows)
    logits_BC = dense(self.config.num_labels, self.config, "score", use_bias=False)(x_BD)
    if self.config.classifier_lm_head and not self.config.tied and self.is_initializing():
      lm_logits(self.config, None, x_BD[:1])   # declares the LM head (GPT2LM reads it)
    return logits_BC.astype(jnp.float32)


class GPT2LabelWords(nn.Module):
  """Classification as text: the LM's next-token logits after the prompt (at its last
  real token, the answer marker), read at each class's label-word token.

  ``label_tokens[c]`` is the first token of class c's label word; the logits
  ``[batch, classes]`` are the LM head's (GPT-2's tied ``wte``) at those tokens, so
  ``argmax`` is the most likely label word and a softmax cross-entropy over them is
  the verbalizer loss of PET and LM-BFF. No ``score`` head: the params are the LM's.
  """

  config: GPT2Config   # or LlamaConfig, GPTNeoXConfig
  label_tokens: tuple[int, ...]

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True,
               peft_slot=None, prompt_active=None):
    wte, x_BD = pooled_hidden(self.config, input_ids, attention_mask, deterministic,
                               peft_slot, prompt_active)
    if not self.config.tied:   # one position per row: the full head's logits, then C
      return lm_logits(self.config, wte, x_BD)[:, jnp.asarray(self.label_tokens)]
    words_CD = jnp.take(wte.embedding, jnp.asarray(self.label_tokens), axis=0)
    x_BD, words_CD = x_BD.astype(wte.dtype), words_CD.astype(wte.dtype)
    return jnp.einsum("bd,cd->bc", x_BD, words_CD).astype(jnp.float32)


class GPT2LM(nn.Module):
  """A trunk with its language-model head: GPT-2's output projection is ``wte``
  itself (tied, no new parameters), as transformers' ``GPT2LMHeadModel``; the other
  families' is ``lm_head`` (``embed_out``) unless tied (``*ForCausalLM``). A
  classifier's params work too where the head is tied (its ``score`` is not read).

  Call: ``model.apply({"params": params}, input_ids, attention_mask=None,
  deterministic=True)`` -> float32 logits ``[batch, seq, vocab]``.

  For generation (see ``cljax.generate``): ``positions [B, T]`` (default
  ``0..T-1``), ``cache`` (a :class:`KVCache`, written at slots
  ``cache_index..cache_index+T-1``; the call then returns ``(logits, cache)``) and
  ``logits_index [B]`` (logits at that token only: ``[B, vocab]``; ``[B, K]``: at K
  tokens, ``[B, K, vocab]``); ``peft_slot`` as in :class:`GPT2Classifier`.
  """

  config: GPT2Config   # or LlamaConfig, GPTNeoXConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True, *,
               positions=None, cache: KVCache | None = None, cache_index=0,
               logits_index=None, peft_slot=None):
    cfg = self.config
    B, T = input_ids.shape
    if cache is None and T > cfg.n_positions:
      raise ValueError(f"Sequence length {T} exceeds n_positions={cfg.n_positions}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    trunk = trunk_of(cfg)
    wte, x_BTD = trunk.embed(cfg, input_ids, positions, deterministic)
    if cache is not None:
      real_BT = (jnp.ones((B, T), bool) if attention_mask is None
                 else attention_mask.astype(bool))
      cache = cache._replace(valid=jax.lax.dynamic_update_slice(cache.valid, real_BT,
                                                                (0, cache_index)))
    block_cls = block_class(cfg, cfg.remat and cache is None)
    if cfg.scan_layers and cache is None:
      x_BTD = scan.scanned_blocks(block_cls, cfg, x_BTD, attention_mask, deterministic,
                                  peft_slot, positions)
    elif cfg.scan_layers:
      x_BTD, cache = scan.scanned_cached_blocks(block_cls, cfg, x_BTD, deterministic, cache,
                                                cache_index, peft_slot, positions)
    new_k, new_v = [], []
    for i in range(0 if cfg.scan_layers else cfg.n_layer):
      block = block_cls(cfg, name=f"{cfg.LAYOUT.block}{i}")
      if cache is None:
        x_BTD = block(x_BTD, attention_mask, deterministic, None, None, peft_slot, None,
                      positions)
        continue
      x_BTD, kv = block(x_BTD, None, deterministic, None,
                        LayerCache(cache.k[i], cache.v[i], cache_index, cache.valid),
                        peft_slot, None, positions)
      new_k.append(kv.k)
      new_v.append(kv.v)
    if logits_index is not None and logits_index.ndim == 1:
      x_BTD = jnp.take_along_axis(x_BTD, logits_index[:, None, None], axis=1)[:, 0]
    elif logits_index is not None:   # [B, K] -> [B, K, D]
      x_BTD = jnp.take_along_axis(x_BTD, logits_index[:, :, None], axis=1)
    logits = lm_logits(cfg, wte, trunk.final_norm(cfg, cfg.LAYOUT.final_norm)(x_BTD))
    if cache is None or cfg.scan_layers:
      return logits if cache is None else (logits, cache)
    return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))

