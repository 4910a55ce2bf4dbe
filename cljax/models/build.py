"""The model a run starts from: its options (``--model``, ``--init``, ``--size``, the
dtype, dropout, the attention kernel) and :func:`build_model`, which turns them into
a Flax module and its params, pretrained weights or a random init, checked against
the tokenizer. The study and LM training both build their models here."""

from __future__ import annotations

import dataclasses

import jax

from absl import logging

from cljax.models import families, hf
from cljax.models.config import SIZE_ALIASES, SIZES, GPT2Config
from cljax.models.heads import GPT2Classifier, GPT2LabelWords, GPT2LM
from cljax.models.surgery import random_params
from cljax.options import DROPOUT, Options, option


@dataclasses.dataclass(frozen=True)
class ModelOptions(Options):
  """The model a run starts from (shared by the study and LM training)."""

  model: str = option("gpt2", "Hub id or local folder of a checkpoint of any family here "
                      "(gpt2, llama, mistral, qwen2, qwen3, gpt_neox: config.json + "
                      "model.safetensors, sharded or not, or pytorch_model.bin).")
  init: str = option("pretrained", "Start from --model's weights, or from a random init of "
                     "--arch at --size.", choices=("pretrained", "random"))
  arch: str = option("gpt2", "Family for --init=random (config.json's model_type).",
                     choices=families.SUPPORTED)
  size: str = option("gpt2", "Size for --init=random: GPT-2's gpt2, gpt2-medium, gpt2-large, "
                     "gpt2-xl; every family's mini (4x256) or tiny (2x64); real shapes: "
                     + ", ".join(n for n in families.ARCH_SIZES if n not in ("tiny", "mini"))
                     + ".")
  tokenizer: str | None = option(None, "Tokenizer hub id or folder (default: --model).")
  dtype: str = option("float32", "Compute dtype; params and optimizer state stay float32.",
                      choices=("float32", "bfloat16"))
  dropout: float | None = option(None, "Dropout for embeddings, attention and residuals "
                                 "(default: the checkpoint's, 0.1 for GPT-2).",
                                 bound=DROPOUT)
  remat: bool = option(False, "Rematerialize blocks in the backward pass (memory).")
  scan_layers: bool = option(False, "Run the blocks under nn.scan, their params stacked: "
                             "one block's compile whatever the depth (big models). Refused "
                             "with PNN, DEN and --freeze=last_k; with dropout, other masks.")
  dropout_rng_impl: str = option(
      "threefry", "How a train step draws its dropout masks: threefry (JAX's partitionable "
      "threefry: the same masks on any device mesh, inside a vmap and at any padded "
      "length, so runs side by side and length buckets change nothing) or rbg (XLA's "
      "RngBitGenerator: other masks, faster on some devices; refused side by side).",
      choices=("rbg", "threefry"))
  attention: str = option("xla", "The fused attention kernel where attention has no "
                          "dropout (evaluation, generation, --dropout=0): xla, or cudnn "
                          "(NVIDIA GPUs with --dtype=bfloat16).", choices=("xla", "cudnn"))

  def config_overrides(self) -> dict:
    """The ``GPT2Config`` fields these options set: remat, the attention kernel, the
    dropout masks' layout, and dropout everywhere when it is given."""
    out: dict = {"remat": self.remat, "scan_layers": self.scan_layers,
                 "attention": self.attention,
                 "length_stable_dropout": self.dropout_rng_impl == "threefry"}
    if self.dropout is not None:
      out.update(embd_pdrop=self.dropout, attn_pdrop=self.dropout, resid_pdrop=self.dropout)
    return out

  def random_init_config(self, tokenizer, n_positions: int, **fields):
    """The config of a random init of ``--arch`` at ``--size`` for ``tokenizer`` (its
    vocabulary, pad and eos), with at least ``n_positions`` positions (1024, as GPT-2,
    or more)."""
    common = dict(vocab_size=len(tokenizer), dtype=self.dtype,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  **fields, **self.config_overrides())
    if self.arch == "gpt2":
      return GPT2Config.from_size(self.size, n_positions=max(1024, n_positions), **common)
    longest = families.ARCH_SIZES[self.size]["max_position_embeddings"]
    return families.random_config(self.arch, self.size, **common,
                                  max_position_embeddings=max(longest, n_positions))

  def check_vocabulary(self, config: GPT2Config, tokenizer) -> None:
    """A loaded model must embed every token the tokenizer can produce."""
    if config.vocab_size < len(tokenizer):
      raise ValueError(f"The model {self.model} has {config.vocab_size} token "
                       f"embeddings but the tokenizer {self.tokenizer or self.model} has "
                       f"{len(tokenizer)} tokens; use the model's own tokenizer.")

  def validate(self) -> None:
    super().validate()
    if self.init == "random" and self.arch == "gpt2" and self.size not in SIZES | SIZE_ALIASES:
      raise ValueError(f"--size={self.size!r}: expected one of "
                       f"{sorted(SIZES) + sorted(SIZE_ALIASES)}.")
    if self.init == "random" and self.arch != "gpt2" and self.size not in families.arch_sizes(
        self.arch):
      raise ValueError(f"--size={self.size!r} for --arch={self.arch}: expected one of "
                       f"{', '.join(families.arch_sizes(self.arch))}.")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("--attention=cudnn needs --dtype=bfloat16: cuDNN's fused attention "
                       "has no float32 kernel.")


def build_model(cfg: ModelOptions, tokenizer, *, kind: str, rng: jax.Array, n_positions: int,
                num_labels: int = 2, label_tokens: tuple[int, ...] | None = None,
                seed: int = 0, lm_head: bool = False):
  """(model, params) of ``cfg``: ``--model``'s weights (a classifier's head, where the
  checkpoint has none, initialized from ``seed``) or a random init of ``--size`` from
  ``rng`` with ``n_positions``. ``kind``: ``classifier`` (a ``score`` head of
  ``num_labels``), ``label_words`` (classification as text over ``label_tokens``) or
  ``lm``; ``lm_head``: a classifier of an untied family keeps its LM head too
  (``classifier_lm_head``). Checks the vocabulary (and for the classifiers the pad id) against
  ``tokenizer``."""
  if kind not in ("classifier", "label_words", "lm"):
    raise ValueError(f"Unknown model kind {kind!r}; expected classifier, label_words or lm.")
  if cfg.init not in ("pretrained", "random"):
    raise ValueError(f"Unknown init {cfg.init!r}; expected 'pretrained' or 'random'.")
  keep = {"classifier_lm_head": True} if lm_head and kind == "classifier" else {}
  if cfg.init == "random":
    config = cfg.random_init_config(tokenizer, n_positions, **keep, **(
        {} if kind == "lm" else {"num_labels": num_labels}))
    model = (GPT2LM(config) if kind == "lm" else GPT2Classifier(config)
             if kind == "classifier" else GPT2LabelWords(config, label_tokens))
    return model, random_params(model, rng)
  overrides = {**cfg.config_overrides(), **keep}
  if kind == "classifier":
    model, params = hf.load_pretrained(cfg.model, num_labels=num_labels, dtype=cfg.dtype,
                                       seed=seed, **overrides)
  else:
    model, params = hf.load_lm(cfg.model, dtype=cfg.dtype, **overrides, **(
        {} if kind == "lm" else {"num_labels": num_labels}))
    if kind == "label_words":
      model = GPT2LabelWords(model.config, label_tokens)
  cfg.check_vocabulary(model.config, tokenizer)
  if model.config.pad_token_id is None:
    logging.info("The model's config has no pad id: it pools at the tokenizer's pad id %d.",
                 tokenizer.pad_token_id)
    model = model.clone(config=model.config.replace(pad_token_id=tokenizer.pad_token_id))
  if kind != "lm" and model.config.pad_token_id != tokenizer.pad_token_id:
    raise ValueError(f"The model's pad id {model.config.pad_token_id} differs from the "
                     f"tokenizer's {tokenizer.pad_token_id}; use the model's tokenizer.")
  return model, params
