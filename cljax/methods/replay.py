"""Replay: a fixed-shape buffer pytree with pure ``init`` / ``add`` / ``sample``,
and the methods built on it: experience replay, DER and DER++, joint training.

The buffer holds token ids, masks, labels, task ids, class masks and the logits
seen when each example was stored (for DER), plus counters. Policies:

- ``reservoir``: Vitter's algorithm R; after n examples every one of them is in the
  buffer with probability capacity / n.
- ``class_balanced``: class-balanced reservoir sampling (Chrysakis and Moens 2020):
  while full, a newcomer from a class that is not among the largest replaces a
  random example of a largest class; one from a largest class goes through
  reservoir sampling within its own class.

Everything is jit-safe with fixed shapes, so steps do not retrace as it fills.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import data as data_lib
from cljax.methods.registry import BuildContext, hparam, register
from cljax.options import NON_NEGATIVE, POSITIVE
from cljax.train.method import Method, StepContext, TaskContext

POLICIES = ("reservoir", "class_balanced")


class Buffer(NamedTuple):
  input_ids: jax.Array       # [M, T] int32
  attention_mask: jax.Array  # [M, T] int32
  labels: jax.Array          # [M] int32 (-1 in empty slots)
  task_ids: jax.Array        # [M] int32
  class_mask: jax.Array      # [M, C] bool
  logits: jax.Array          # [M, C] float32, as seen when stored
  size: jax.Array            # int32: filled slots
  seen: jax.Array            # int32: examples offered so far
  seen_per_class: jax.Array  # [C] int32


def init(capacity: int, max_length: int, num_labels: int) -> Buffer:
  """An empty buffer of ``capacity`` examples."""
  if capacity <= 0:
    raise ValueError(f"Replay buffer capacity must be positive, got {capacity}.")
  return Buffer(
      input_ids=jnp.zeros((capacity, max_length), jnp.int32),
      attention_mask=jnp.zeros((capacity, max_length), jnp.int32),
      labels=jnp.full((capacity,), -1, jnp.int32),
      task_ids=jnp.zeros((capacity,), jnp.int32),
      class_mask=jnp.zeros((capacity, num_labels), bool),
      logits=jnp.zeros((capacity, num_labels), jnp.float32),
      size=jnp.zeros((), jnp.int32), seen=jnp.zeros((), jnp.int32),
      seen_per_class=jnp.zeros((num_labels,), jnp.int32))


def _slot_reservoir(buf: Buffer, label, key):
  """Slot for the next example under algorithm R, or -1 to drop it."""
  capacity = buf.labels.shape[0]
  j = jax.random.randint(key, (), 0, buf.seen + 1)  # uniform in [0, seen]
  return jnp.where(buf.size < capacity, buf.size, jnp.where(j < capacity, j, -1))


def _slot_class_balanced(buf: Buffer, label, key):
  capacity, num_labels = buf.labels.shape[0], buf.seen_per_class.shape[0]
  counts = jnp.sum(jax.nn.one_hot(buf.labels, num_labels, dtype=jnp.int32), axis=0)
  largest = counts == jnp.max(counts)
  k_pick, k_res = jax.random.split(key)
  scores = jax.random.uniform(k_pick, (capacity,))
  # A random slot of a largest class (when y is not one of them) or of y's class.
  pool = jnp.where(largest[label], buf.labels == label,
                   largest[jnp.clip(buf.labels, 0)] & (buf.labels >= 0))
  victim = jnp.argmax(jnp.where(pool, scores, -1.0))
  # Reservoir within y's class: keep with probability count_y / seen_y.
  keep = jax.random.randint(k_res, (), 0, buf.seen_per_class[label] + 1) < counts[label]
  full_slot = jnp.where(largest[label], jnp.where(keep, victim, -1), victim)
  return jnp.where(buf.size < capacity, buf.size, full_slot)


def add(buf: Buffer, batch: dict, key: jax.Array, policy: str = "reservoir",
        logits: jax.Array | None = None) -> Buffer:
  """Offers each example of ``batch`` with ``weights`` > 0 to the buffer, in order
  (its rows as wide as the buffer's: :func:`widen` a length-bucketed batch first)."""
  if batch["input_ids"].shape[1] != buf.input_ids.shape[1]:
    raise ValueError(f"Rows of {batch['input_ids'].shape[1]} tokens offered to a replay "
                     f"buffer of {buf.input_ids.shape[1]}; widen() the batch first.")
  if policy not in POLICIES:
    raise ValueError(f"Unknown replay policy {policy!r}; expected one of {POLICIES}.")
  slot_fn = _slot_reservoir if policy == "reservoir" else _slot_class_balanced
  n = batch["labels"].shape[0]
  if logits is None:
    logits = jnp.zeros((n, buf.logits.shape[1]), jnp.float32)
  keys = jax.random.split(key, n)

  def one(b: Buffer, i):
    real = batch["weights"][i] > 0
    label = batch["labels"][i]
    slot = slot_fn(b, label, keys[i])
    write = real & (slot >= 0)
    s = jnp.clip(slot, 0)

    def put(arr, value):
      return arr.at[s].set(jnp.where(write, value, arr[s]))

    b = Buffer(
        input_ids=put(b.input_ids, batch["input_ids"][i]),
        attention_mask=put(b.attention_mask, batch["attention_mask"][i]),
        labels=put(b.labels, label),
        task_ids=put(b.task_ids, batch["task_ids"][i]),
        class_mask=put(b.class_mask, batch["class_mask"][i]),
        logits=put(b.logits, logits[i].astype(jnp.float32)),
        size=b.size + (write & (b.size < b.labels.shape[0])).astype(jnp.int32),
        seen=b.seen + real.astype(jnp.int32),
        seen_per_class=b.seen_per_class.at[label].add(real.astype(jnp.int32)))
    return b, None

  buf, _ = jax.lax.scan(one, buf, jnp.arange(n))
  return buf


def sample(buf: Buffer, key: jax.Array, n: int) -> dict:
  """``n`` examples drawn uniformly (with replacement) from the filled slots, as a
  batch; ``weights`` are 0 while the buffer is empty."""
  idx = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1))
  nonempty = (buf.size > 0).astype(jnp.float32)
  return {"input_ids": buf.input_ids[idx], "attention_mask": buf.attention_mask[idx],
          "labels": jnp.clip(buf.labels[idx], 0), "task_ids": buf.task_ids[idx],
          "class_mask": buf.class_mask[idx], "weights": jnp.full((n,), nonempty),
          "logits": buf.logits[idx]}


# ----------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------

_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "task_ids", "class_mask", "weights")


def widen(batch: dict, length: int, pad_id: int) -> dict:
  """``batch`` with its ``input_ids`` and ``attention_mask`` right padded to ``length``
  (pad id, mask 0): a length-bucketed batch (:func:`cljax.data.trim_to_bucket`) made
  as wide as the buffer's rows. Exact: padding changes no logit."""
  extra = length - batch["input_ids"].shape[1]
  if extra < 0:
    raise ValueError(f"A batch of {batch['input_ids'].shape[1]} tokens is wider than the "
                     f"replay buffer's {length}; the study's --max_length must not change.")
  if extra == 0:
    return batch
  out = dict(batch)
  for key, value in (("input_ids", pad_id), ("attention_mask", 0)):
    out[key] = jnp.pad(batch[key], ((0, 0), (0, extra)), constant_values=value)
  return out


def append_replayed(batch: dict, extra: dict, ce_weight: float, tag: str,
                    pad_id: int) -> dict:
  """Appends replayed examples; ``ce_weight`` 0 keeps them out of the main loss. The
  batch is first padded (``pad_id``) to the replayed rows' width (the buffer stores
  rows at ``--max_length``)."""
  batch = widen(batch, extra["input_ids"].shape[1], pad_id)
  out = {k: jnp.concatenate([batch[k], extra[k].astype(batch[k].dtype)
                             if k != "weights" else extra[k] * ce_weight])
         for k in _BATCH_KEYS}
  n_new, n_rep = batch["labels"].shape[0], extra["labels"].shape[0]
  for k, v in batch.items():
    if k == "peft_slot":      # per-task modules: a replayed example takes its task's
      out[k] = jnp.concatenate([v, extra["task_ids"].astype(v.dtype)])
    elif k == "prompt_active":  # progressive prompts: the same prompts as the others
      out[k] = jnp.concatenate([v, jnp.broadcast_to(v[:1], (n_rep,) + v.shape[1:])])
    elif k not in _BATCH_KEYS:  # keys of methods composed earlier: pad
      out[k] = jnp.concatenate([v, jnp.zeros((n_rep,) + v.shape[1:], v.dtype)])
  out[f"{tag}_weight"] = jnp.concatenate([jnp.zeros((n_new,)), extra["weights"]])
  out[f"{tag}_logits"] = jnp.concatenate(
      [jnp.zeros((n_new,) + extra["logits"].shape[1:]), extra["logits"]])
  out.setdefault("new_weight", jnp.concatenate([batch["weights"], jnp.zeros((n_rep,))]))
  return out


def incoming_examples(batch: dict, logits: jax.Array):
  """The examples of the incoming stream (not replayed ones) and their logits."""
  w = batch.get("new_weight", batch["weights"])
  return dict({k: batch[k] for k in _BATCH_KEYS}, weights=w), logits


@dataclasses.dataclass(frozen=True)
class BufferConfig:
  replay_size: int = hparam(200, "Replay buffer capacity (examples).",
                              bound=POSITIVE)
  replay_policy: str = hparam("reservoir", "Buffer policy: reservoir (Vitter's R) or "
                              "class_balanced.", choices=POLICIES)


@dataclasses.dataclass(frozen=True)
class ReplayConfig(BufferConfig):
  replay_batch_size: int = hparam(8, "Replayed examples added to each training batch.",
                                    bound=POSITIVE)


@dataclasses.dataclass(frozen=True)
class DERConfig(ReplayConfig):
  der_alpha: float = hparam(0.5, "DER/DER++ weight of the logit-matching term.",
                             bound=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class DERPPConfig(DERConfig):
  der_beta: float = hparam(0.5, "DER++ weight of the replayed-label CE term.",
                            bound=NON_NEGATIVE)


def _replay_method(name: str, hp: ReplayConfig, ctx: BuildContext, *, ce_weight: float,
                   der_alpha: float = 0.0, der_beta: float = 0.0) -> Method:
  if hp.replay_policy not in POLICIES:
    raise ValueError(f"Unknown --replay_policy {hp.replay_policy!r}; expected one of "
                     f"{POLICIES}.")
  r, pad = hp.replay_batch_size, ctx.need("pad_token_id", name)

  def init_fn(params):
    del params
    return init(hp.replay_size, ctx.max_length, ctx.num_labels)

  def prepare_batch(buf, sctx: StepContext):
    k1, k2 = jax.random.split(sctx.rng)
    batch = append_replayed(sctx.batch, sample(buf, k1, r), ce_weight, f"{name}_a", pad)
    if der_beta:
      batch = append_replayed(batch, sample(buf, k2, r), 0.0, f"{name}_b", pad)
    return batch

  def loss(buf, sctx: StepContext):
    del buf
    batch, logits = sctx.batch, sctx.logits
    total = jnp.zeros((), jnp.float32)
    if der_alpha:
      w = batch[f"{name}_a_weight"]
      mse = jnp.mean(jnp.square(logits - batch[f"{name}_a_logits"]), axis=-1)
      total += der_alpha * jnp.sum(w * mse) / jnp.maximum(jnp.sum(w), 1.0)
    if der_beta:
      w = batch[f"{name}_b_weight"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      total += der_beta * jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)
    return total, ()

  def after_step(buf, sctx: StepContext):
    examples, ex_logits = incoming_examples(sctx.batch, jax.lax.stop_gradient(sctx.logits))
    return add(buf, examples, sctx.rng, hp.replay_policy, ex_logits)

  return Method(name=name, init=init_fn, prepare_batch=prepare_batch, loss=loss,
                after_step=after_step)


@register("replay", "experience replay: buffer examples mixed into each batch", ReplayConfig)
def replay(hp: ReplayConfig, ctx: BuildContext) -> Method:
  return _replay_method("replay", hp, ctx, ce_weight=1.0)


@register("der", "DER: replay of stored logits (Buzzega et al. 2020)", DERConfig)
def der(hp: DERConfig, ctx: BuildContext) -> Method:
  return _replay_method("der", hp, ctx, ce_weight=0.0, der_alpha=hp.der_alpha)


@register("derpp", "DER++: stored logits and labels (Buzzega et al. 2020)", DERPPConfig)
def derpp(hp: DERPPConfig, ctx: BuildContext) -> Method:
  return _replay_method("derpp", hp, ctx, ce_weight=0.0, der_alpha=hp.der_alpha,
                        der_beta=hp.der_beta)


def _everything_seen(tctx: TaskContext):
  return data_lib.concat([*tctx.previous_train, tctx.train])


@register("joint", "joint training on every task seen so far (the upper bound)")
def joint(hp: None, ctx: BuildContext) -> Method:
  del hp, ctx
  return Method(name="joint", train_arrays=_everything_seen)
