"""Architectural methods with parameter-efficient modules: a LoRA or an adapter per
task (``lora_per_task``, ``adapter_per_task``; AdapterCL, Madotto et al. 2021), O-LoRA
(Wang et al. 2023), Progressive Prompts (Razdaibiedina et al. 2023) and Progressive
Neural Networks (Rusu et al. 2016).

The modules live in the model (``cljax.models.LoRA``, ``Adapter``: ``peft_slots`` of
each, one per task, added by the study from ``Method.declares.model_options``); the base
weights are frozen through the optimizer mask and task k trains slot k alone.

Per-task modules. Training task k runs every example through its task's slot
(``peft_slot = task_ids``) with the cross-entropy over its task's classes (the
labels trick: the shared head's rows of other tasks get no gradient, so slot k and
task k's head rows form task k's model). Evaluation: with the task given (the
task-aware accuracy) an example goes through its task's slot; without it (the
class-incremental accuracy) every trained slot is tried and the one whose model is
most confident is kept, the lowest entropy over its task's classes
(``--peft_infer=entropy``) or the lowest perplexity of the input under the LM head
(``--peft_infer=perplexity``, AdapterCL's rule); the prediction is then over that
slot's task's classes. ``task_inference_accuracy_matrix`` in ``results.json`` is how
often the chosen slot is the example's task.

O-LoRA: every slot is summed into the forward (a slot not trained yet has ``B = 0``
and adds nothing), no task identity at test; task k trains ``A_k, B_k`` with
``lambda1 * sum_{s<k} sum |A_s^T A_k| + lambda2 * (||A_k|| + ||B_k||)`` added to its
loss, over every LoRA target (the authors' code: absolute values of the products of
the old and new A, and the Frobenius norms, not squared, of the new A and B).

Progressive Neural Networks: a GPT-2 column per task (the first the loaded model, each
new one a copy of it), lateral connections from every earlier column into each later
one, task k training column k and its laterals; evaluated as the per-task modules
(the task's column, or the most confident one).

Progressive Prompts: task k trains a soft prompt ``P_k`` placed in front of the
earlier, frozen ones, ``[P_k; ...; P_0; x]``, and its head rows (the labels trick, as
the paper's per-task heads); every prompt learned so far is in front at test, no task
identity needed. The paper's residual MLP reparameterization of the prompts is not
implemented.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.methods import head_fixes
from cljax.methods.registry import BuildContext, hparam, register
from cljax.models import column_prefix, is_peft, peft_slot_of
from cljax.options import DROPOUT, NON_NEGATIVE, POSITIVE
from cljax.train import losses
from cljax.train.method import Declarations, Method, StepContext, TaskContext

INFERENCE = ("entropy", "perplexity")


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
  lora_rank: int = hparam(8, "LoRA rank r.", bound=POSITIVE)
  lora_alpha: float = hparam(16.0, "LoRA alpha: the update is scaled by alpha / r.",
                             bound=POSITIVE)
  lora_dropout: float = hparam(0.0, "Dropout on the input of each LoRA update.",
                               bound=DROPOUT)
  lora_targets: str = hparam(
      "attention_in", "Projections given a LoRA, comma-separated: roles (attention_in, "
      "attention_out, mlp_in, mlp_out) or the family's own names (GPT-2: c_attn, c_proj, "
      "c_fc; Llama: q_proj ... down_proj; GPT-NeoX: query_key_value ... dense_4h_to_h).")


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  peft_infer: str = hparam("entropy", "Per-task modules without the task given: keep the "
                           "slot with the lowest prediction entropy, or the lowest input "
                           "perplexity under the LM head (AdapterCL).", choices=INFERENCE)


@dataclasses.dataclass(frozen=True)
class LoRAPerTaskConfig(LoRAOptions, InferenceOptions):
  pass


@dataclasses.dataclass(frozen=True)
class AdapterPerTaskConfig(InferenceOptions):
  adapter_size: int = hparam(32, "Bottleneck width of each adapter.", bound=POSITIVE)


@dataclasses.dataclass(frozen=True)
class OLoRAConfig(LoRAOptions):
  olora_lambda1: float = hparam(0.5, "O-LoRA: weight of the orthogonality loss.",
                                bound=NON_NEGATIVE)
  olora_lambda2: float = hparam(0.0, "O-LoRA: weight of the norm of the new A and B.",
                                bound=NON_NEGATIVE)


def lora_options(hp: LoRAOptions, ctx: BuildContext) -> dict:
  """The GPT2Config fields of ``hp``'s LoRA, one slot per task."""
  layout = ctx.layout
  targets = layout.lora_names(t.strip() for t in hp.lora_targets.split(",") if t.strip())
  unknown = sorted(set(targets) - set(layout.projections))
  if unknown or not targets:
    raise ValueError(f"--lora_targets={hp.lora_targets!r}: expected some of "
                     f"{','.join(dict(layout.roles))} or of {ctx.family}'s "
                     f"{','.join(layout.projections)}.")
  return dict(lora_rank=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
              lora_targets=targets, peft_slots=ctx.num_tasks)


def slot_trainable(params, task_index: int):
  """True for slot ``task_index``'s LoRA / adapter parameters and the score head."""
  def keep(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if is_peft(path):
      return peft_slot_of(path) == task_index
    return names[0] == "score"
  return jax.tree_util.tree_map_with_path(keep, params)


# ----------------------------------------------------------------------------
# Per-task modules and task inference
# ----------------------------------------------------------------------------

class PerTaskState(NamedTuple):
  active: jax.Array        # [S] bool: slots of tasks begun so far
  slot_classes: jax.Array  # [S, C] bool: the classes of each slot's task


def _input_nll(lm_logits_BTV, input_ids_BT, mask_BT) -> jax.Array:
  """[B] mean next-token negative log-likelihood of each row's real tokens."""
  nll_BT, w_BT = losses.next_token_losses(lm_logits_BTV, input_ids_BT, mask_BT)
  return jnp.sum(nll_BT * w_BT, -1) / jnp.maximum(jnp.sum(w_BT, -1), 1.0)


def _entropy(logits_BC, classes_C) -> jax.Array:
  logp = jax.nn.log_softmax(jnp.where(classes_C, logits_BC, -jnp.inf), axis=-1)
  return -jnp.sum(jnp.where(classes_C, jnp.exp(logp) * logp, 0.0), axis=-1)


def infer_task(state: PerTaskState, ctx: StepContext, infer: str, slot_inputs=None):
  """(class-incremental logits, task-given logits, sums): each trained slot is tried and
  the most confident kept; its logits outside its task's classes are pushed to -1e9.
  ``slot_inputs(s, B)``: the model inputs that run a batch of B as slot s (default:
  ``peft_slot``; DEN: the units task s uses)."""
  batch, S = ctx.batch, state.active.shape[0]
  B = batch["labels"].shape[0]
  slot_inputs = slot_inputs or (lambda s, n: {"peft_slot": jnp.full((n,), s)})
  per_slot = jnp.stack([ctx.apply_fn(ctx.params, {**batch, **slot_inputs(s, B)})
                        for s in range(S)])                                  # [S, B, C]
  if infer == "entropy":
    score_SB = jnp.stack([_entropy(per_slot[s], state.slot_classes[s]) for s in range(S)])
  else:
    score_SB = jnp.stack([_input_nll(ctx.lm_apply_fn(
        ctx.params, batch["input_ids"], batch["attention_mask"],
        peft_slot=jnp.full((B,), s)), batch["input_ids"], batch["attention_mask"])
        for s in range(S)])
  chosen_B = jnp.argmin(jnp.where(state.active[:, None], score_SB, jnp.inf), axis=0)
  rows = jnp.arange(B)
  inferred = jnp.where(state.slot_classes[chosen_B], per_slot[chosen_B, rows], -1e9)
  given = per_slot[jnp.clip(batch["task_ids"], 0, S - 1), rows]
  began = jnp.any(state.active)     # before the first task: the plain model's logits
  hits = (chosen_B == batch["task_ids"]) & began
  return (jnp.where(began, inferred, given), given,
          {"task_inference_correct": jnp.sum(hits * batch["weights"])})


def _per_task(name: str, options: dict, infer: str, ctx: BuildContext,
              trainable=slot_trainable) -> Method:
  if infer not in INFERENCE:
    raise ValueError(f"Unknown --peft_infer={infer!r}; expected one of {list(INFERENCE)}.")
  S, C = ctx.num_tasks, ctx.num_labels

  def init(params):
    del params
    return PerTaskState(jnp.zeros((S,), bool), jnp.zeros((S, C), bool))

  def before_task(state: PerTaskState, tctx: TaskContext):
    k = tctx.task_index
    classes = np.zeros((C,), bool)
    classes[list(tctx.tasks[k].head_labels)] = True
    return PerTaskState(state.active.at[k].set(True),
                        state.slot_classes.at[k].set(jnp.asarray(classes)))

  def prepare_batch(state, sctx: StepContext):
    del state
    return head_fixes.own_classes_only({**sctx.batch, "peft_slot": sctx.batch["task_ids"]})

  return Method(name=name, init=init, before_task=before_task, prepare_batch=prepare_batch,
                eval_logits=lambda state, sctx: infer_task(state, sctx, infer),
                declares=Declarations(trainable=trainable,
                                      model_options=tuple(options.items()),
                                      reads_lm=infer == "perplexity"))


@register("lora_per_task", "a LoRA per task, earlier ones frozen, the task given or inferred "
          "at test (AdapterCL's recipe with LoRA)", LoRAPerTaskConfig)
def lora_per_task(hp: LoRAPerTaskConfig, ctx: BuildContext) -> Method:
  return _per_task("lora_per_task", lora_options(hp, ctx), hp.peft_infer, ctx)


@register("adapter_per_task", "a residual adapter per task after each block, earlier ones "
          "frozen, the task given or inferred at test (AdapterCL, Madotto et al. 2021)",
          AdapterPerTaskConfig)
def adapter_per_task(hp: AdapterPerTaskConfig, ctx: BuildContext) -> Method:
  return _per_task("adapter_per_task",
                   dict(adapter_size=hp.adapter_size, peft_slots=ctx.num_tasks),
                   hp.peft_infer, ctx)


# ----------------------------------------------------------------------------
# O-LoRA
# ----------------------------------------------------------------------------

def lora_factors(params) -> list[tuple[list, list]]:
  """([A_0, A_1, ...], [B_0, ...]) of every LoRA target in ``params``."""
  out = []

  def visit(tree):
    for name, sub in tree.items():
      if name.endswith("_lora"):
        slots = len([k for k in sub if k.startswith("A_")])
        out.append(([sub[f"A_{s}"] for s in range(slots)], [sub[f"B_{s}"] for s in range(slots)]))
      elif isinstance(sub, dict):
        visit(sub)
  visit(params)
  return out


def olora_penalty(params, task, lambda1: float, lambda2: float) -> jax.Array:
  """``lambda1 * sum_{s<k} sum |A_s^T A_k| + lambda2 * (||A_k|| + ||B_k||)`` summed over
  the LoRA targets, for the (traced) task index ``task``."""
  total = jnp.zeros((), jnp.float32)
  for As, Bs in lora_factors(params):
    for k in range(len(As)):
      a_k = As[k].astype(jnp.float32)
      orth = sum((jnp.sum(jnp.abs(As[s].astype(jnp.float32).T @ a_k)) for s in range(k)),
                 jnp.zeros((), jnp.float32))
      term = lambda1 * orth
      if lambda2:
        term += lambda2 * (_norm(a_k) + _norm(Bs[k].astype(jnp.float32)))
      total += jnp.where(task == k, term, 0.0)
  return total


def _norm(x) -> jax.Array:
  """The Frobenius norm, with gradient 0 (not NaN) at 0: a new B starts at zero."""
  sq = jnp.sum(jnp.square(x))
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


@register("olora", "O-LoRA: a LoRA per task, all summed in the forward, the new one kept "
          "orthogonal to the old (Wang et al. 2023)", OLoRAConfig)
def olora(hp: OLoRAConfig, ctx: BuildContext) -> Method:
  def before_task(state, tctx: TaskContext):
    del state
    return jnp.asarray(tctx.task_index, jnp.int32)

  def loss(task, sctx: StepContext):
    return olora_penalty(sctx.params, task, hp.olora_lambda1, hp.olora_lambda2), ()

  return Method(name="olora", init=lambda params: jnp.zeros((), jnp.int32),
                before_task=before_task, loss=loss, declares=Declarations(
                    trainable=slot_trainable,
                    model_options=tuple(lora_options(hp, ctx).items())))


# ----------------------------------------------------------------------------
# Progressive Prompts
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptConfig:
  prompt_length: int = hparam(10, "Progressive Prompts: soft-prompt tokens per task.",
                              bound=POSITIVE)


@register("progressive_prompts", "Progressive Prompts: a soft prompt per task, earlier ones "
          "frozen and kept in front, the base frozen (Razdaibiedina et al. 2023)",
          PromptConfig)
def progressive_prompts(hp: PromptConfig, ctx: BuildContext) -> Method:
  S = ctx.num_tasks

  def in_use(task, batch) -> jax.Array:
    B = batch["labels"].shape[0]
    return jnp.broadcast_to(jnp.arange(S) <= task, (B, S))

  def before_task(state, tctx: TaskContext):
    del state
    return jnp.asarray(tctx.task_index, jnp.int32)

  def prepare_batch(task, sctx: StepContext):
    return head_fixes.own_classes_only({**sctx.batch, "prompt_active": in_use(task, sctx.batch)})

  def eval_logits(task, sctx: StepContext):
    logits = sctx.apply_fn(sctx.params, {**sctx.batch,
                                         "prompt_active": in_use(task, sctx.batch)})
    return logits, logits, {}

  return Method(name="progressive_prompts", init=lambda params: jnp.zeros((), jnp.int32),
                before_task=before_task, prepare_batch=prepare_batch, eval_logits=eval_logits,
                declares=Declarations(trainable=slot_trainable, model_options=(
                    ("prompt_length", hp.prompt_length), ("peft_slots", S))))


# ----------------------------------------------------------------------------
# Progressive Neural Networks
# ----------------------------------------------------------------------------

PNN_MAX_WIDTH = 768   # GPT-2 small: a whole GPT-2 per task, laterals quadratic in tasks


def column_trainable(params, task_index: int):
  """True for column ``task_index`` (its trunk and its laterals) and the score head."""
  own = column_prefix(task_index)

  def keep(name: str) -> bool:
    if name == "score":
      return True
    if task_index == 0:
      return not name.startswith("col")
    return name.startswith(own)
  return {name: jax.tree.map(lambda _, k=keep(name): k, sub) for name, sub in params.items()}


@register("pnn", "Progressive Neural Networks: a new GPT-2 column per task with lateral "
          "connections from the earlier, frozen columns (Rusu et al. 2016); small models "
          "only", InferenceOptions, heads=("score",))
def pnn(hp: InferenceOptions, ctx: BuildContext) -> Method:
  ctx.check_per_block("pnn")
  if ctx.head != "score":
    raise ValueError("pnn gives each column its pooled output for the score head; --head=lm "
                     "is not supported (use --head=score).")
  if ctx.need("n_embd", "pnn") > PNN_MAX_WIDTH:
    raise ValueError(f"pnn keeps a whole GPT-2 per task ({ctx.num_tasks} here) and "
                     f"laterals between them: refused above GPT-2 small's width "
                     f"({PNN_MAX_WIDTH}); this model's is {ctx.n_embd}. Use lora_per_task "
                     "or adapter_per_task for large models.")
  if hp.peft_infer != "entropy":
    raise ValueError("pnn infers the task by entropy only (--peft_infer=entropy): its "
                     "columns have no language-model head to measure perplexity with.")
  return _per_task("pnn", dict(pnn_columns=ctx.num_tasks), hp.peft_infer, ctx,
                   trainable=column_trainable)
