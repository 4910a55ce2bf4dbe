"""GPT-2's hyperparameters: the config dataclass, the standard sizes, the compute and
parameter dtypes, and the conversion from and to Hugging Face's ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, NamedTuple
from collections.abc import Mapping

import jax.numpy as jnp

# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

# Standard sizes (n_layer, n_embd, n_head), as in Hugging Face's hub configs, plus
# tiny sizes for tests and CPU smoke runs.
SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    # Small random-init sizes for CPU runs and tests.
    "mini": dict(n_layer=4, n_embd=256, n_head=4),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
}
SIZE_ALIASES = {"small": "gpt2", "medium": "gpt2-medium", "large": "gpt2-large",
                "xl": "gpt2-xl"}

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
  """Maps 'float32' / 'bfloat16' / a jnp dtype to a jnp dtype, with a clear error."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type


class Layout(NamedTuple):
  """A family's declared interface: where the parts of its params live, so that the
  methods (freezing, LoRA targets, new token rows, PNN's columns) name roles, never
  one family's module names."""
  embedding: str                  # the token embedding (an ``nn.Embed``)
  positions: str | None           # learned position embeddings (None: rotary)
  block: str                      # block i is ``f"{block}{i}"``
  attention: str                  # a block's attention module
  mlp: str                        # a block's MLP module
  norms: tuple[str, ...]          # every norm's module name (blocks, attention, top)
  final_norm: str                 # the norm after the last block
  lm_head: str                    # the untied LM head (where the config is not tied)
  projections: tuple[str, ...]    # the linear layers a LoRA may target
  roles: tuple                    # (role, projections): attention_in, attention_out, ...
  # DEN's unit in the MLP: (key, projection, DEN's capacity projection) per incoming
  # projection (a column of each, its bias where it has one), then the outgoing one
  # (a row; its key is "proj"). GPT-2: c_fc's column and c_proj's row; a gated MLP:
  # gate_proj's and up_proj's columns and down_proj's row.
  den_units: tuple = ()

  def lora_names(self, targets) -> tuple[str, ...]:
    """The projections named by ``targets`` (roles or this family's own names)."""
    roles = dict(self.roles)
    out: list[str] = []
    for t in targets:
      for name in roles.get(t, (t,)):
        if name not in out:
          out.append(name)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TrunkOptions:
  """What every family's config carries beside its architecture: remat, the attention
  kernel, dropout's layout, and the modules the methods add (LoRA, adapters, prompts,
  progressive columns, DEN's capacity). Subclasses set :data:`LAYOUT`."""

  LAYOUT: ClassVar[Layout]

  remat: bool = False
  # The blocks under nn.scan, their params stacked (cljax/models/scan.py): one block's
  # compile whatever the depth.
  scan_layers: bool = False
  # The fused attention kernel where attention has no dropout (evaluation, generation,
  # attn_pdrop=0): "xla" (XLA's, everywhere) or "cudnn" (NVIDIA GPUs, float16 or
  # bfloat16 compute only; the values differ from XLA's in the last bits).
  attention: str = "xla"
  # Dropout masks drawn with the sequence axes first (``dropout``): a position's mask
  # does not depend on the length its batch is padded to (with threefry keys).
  length_stable_dropout: bool = False
  # Parameter-efficient modules (none by default), ``peft_slots`` of each (one per
  # task for the per-task methods): LoRA on the projections named in ``lora_targets``
  # (the family's own names, ``LAYOUT.projections``) and a bottleneck adapter after
  # each block. They add parameters and leave the base ones as they are.
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  adapter_size: int = 0
  prompt_length: int = 0     # soft-prompt tokens per slot, prepended to the input
  peft_slots: int = 1
  # Progressive Neural Networks: this many columns (0 or 1: none), laterals from
  # every earlier column's block outputs into each later one.
  pnn_columns: int = 0
  # Dynamically Expandable Networks: this many MLP units per block allocated ahead
  # beside the loaded ones (``Layout.den_units``: GPT-2's ``den_fc``, ``den_proj``),
  # used only where the method's per-example mask (``den_units``) says
  # (cljax/models/den.py); 0: none.
  den_capacity: int = 0
  # and this many token-embedding rows beside the embedding (``den_wte``): the copies
  # of the rows DEN splits, read where the per-example row indices (``den_rows``) say.
  den_rows: int = 0
  # A classifier of a family with an untied LM head keeps that head (``lm_head``,
  # ``embed_out``) beside ``score``, for the methods that read the LM (generative
  # replay, task inference by perplexity); tied families (GPT-2) always have it.
  classifier_lm_head: bool = False

  def check_options(self) -> None:
    """One-line errors for options that do not fit together (or this family)."""
    if self.attention not in ("xla", "cudnn"):
      raise ValueError(f"attention={self.attention!r}: expected 'xla' or 'cudnn'.")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise ValueError("attention='cudnn' needs a float16 or bfloat16 compute dtype "
                       "(--dtype=bfloat16); cuDNN's fused attention has no float32 kernel.")
    unknown = sorted(set(self.lora_targets) - set(self.LAYOUT.projections))
    if unknown:
      raise ValueError(f"LoRA targets {unknown}: expected some of "
                       f"{list(self.LAYOUT.projections)}.")
    if min(self.lora_rank, self.adapter_size, self.prompt_length) < 0 or self.peft_slots < 1:
      raise ValueError(f"lora_rank={self.lora_rank}, adapter_size={self.adapter_size}, "
                       f"prompt_length={self.prompt_length} and peft_slots="
                       f"{self.peft_slots}: expected >= 0, >= 0, >= 0 and >= 1.")
    if self.pnn_columns > 1 and (self.lora_rank or self.adapter_size or self.prompt_length):
      raise ValueError("Progressive columns (pnn_columns) do not combine with LoRA, "
                       "adapters or prompts.")
    if self.scan_layers and (self.pnn_columns > 1 or self.den_capacity or self.den_rows):
      raise ValueError("Layers under nn.scan (scan_layers) share one block's structure; "
                       "PNN's columns and DEN's units change single blocks: drop "
                       "--scan_layers for them.")
    if (self.den_capacity or self.den_rows) and (
        self.lora_rank or self.adapter_size or self.prompt_length or self.pnn_columns > 1):
      raise ValueError("DEN's units and rows (den_capacity, den_rows) do not combine with "
                       "LoRA, adapters, prompts or progressive columns.")

  @property
  def has_peft(self) -> bool:
    """Whether the model holds modules a plain Hugging Face checkpoint cannot."""
    return bool(self.lora_rank or self.adapter_size or self.prompt_length
                or self.pnn_columns > 1 or self.den_capacity or self.den_rows)

  @property
  def family(self) -> str:
    """The ``model_type`` of ``config.json``."""
    return getattr(self, "model_type", "gpt2")

  def replace(self, **kwargs):
    return dataclasses.replace(self, **kwargs)


GPT2_LAYOUT = Layout(
    embedding="wte", positions="wpe", block="h_", attention="attn", mlp="mlp",
    norms=("ln_1", "ln_2", "ln_f"), final_norm="ln_f", lm_head="wte",
    projections=LORA_TARGETS,
    roles=(("attention_in", ("c_attn",)), ("attention_out", ("c_proj",)),
           ("mlp_in", ("c_fc",)), ("mlp_out", ("c_proj",))),
    den_units=(("fc", "c_fc", "den_fc"), ("proj", "c_proj", "den_proj")))


@dataclasses.dataclass(frozen=True)
class GPT2Config(TrunkOptions):
  """Hyperparameters of a GPT-2 classifier (Hugging Face names where they exist).

  ``dtype`` is the compute dtype (activations, matmuls); ``param_dtype`` is the
  storage dtype of the parameters (float32 master weights by default). Logits are
  always returned in float32.
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  initializer_range: float = 0.02
  num_labels: int = 2
  pad_token_id: int | None = 50256
  eos_token_id: int = 50256
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora_targets: tuple[str, ...] = ("c_attn",)

  LAYOUT: ClassVar[Layout] = GPT2_LAYOUT

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
    as_dtype(self.dtype), as_dtype(self.param_dtype)
    self.check_options()

  @property
  def tied(self) -> bool:
    return True

  @property
  def kv_heads(self) -> int:
    return self.n_head

  @property
  def head_size(self) -> int:
    return self.n_embd // self.n_head

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd

  @classmethod
  def from_size(cls, size: str, **overrides) -> GPT2Config:
    """A config of a named size: gpt2 / gpt2-medium / gpt2-large / gpt2-xl (or
    small / medium / large / xl), or the random-init sizes mini / tiny."""
    name = SIZE_ALIASES.get(size, size)
    if name not in SIZES:
      raise ValueError(
          f"Unknown GPT-2 size {size!r}; expected one of "
          f"{sorted(SIZES) + sorted(SIZE_ALIASES)}.")
    return cls(**{**SIZES[name], **overrides})

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any] | str | os.PathLike,
              **overrides) -> GPT2Config:
    """Builds a config from a Hugging Face ``config.json`` (a dict or a path).

    The pad id is the checkpoint's ``pad_token_id``, or its ``eos_token_id`` when
    it has none (pad = eos, as the study does).
    """
    if not isinstance(hf_config, Mapping):
      with open(hf_config) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type != "gpt2":
      raise ValueError(
          f"This checkpoint's config.json has model_type={model_type!r}, expected "
          "'gpt2': cljax implements the GPT-2 architecture only. Pass a GPT-2 "
          "checkpoint (for example 'gpt2' or a folder saved from GPT2Model / "
          "GPT2ForSequenceClassification).")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"Unsupported activation_function {act!r}; cljax implements "
                       "GPT-2's tanh-approximate GELU ('gelu_new').")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
      if hf_config.get(flag):
        raise ValueError(f"Unsupported GPT-2 option {flag}=True in config.json.")
    if hf_config.get("scale_attn_weights", True) is False:
      raise ValueError("Unsupported GPT-2 option scale_attn_weights=False.")
    eos = hf_config.get("eos_token_id", 50256)
    pad = hf_config.get("pad_token_id")
    kwargs = dict(
        vocab_size=hf_config["vocab_size"],
        n_positions=hf_config.get("n_positions", 1024),
        n_embd=hf_config["n_embd"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_inner=hf_config.get("n_inner"),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf_config.get("embd_pdrop", 0.1),
        attn_pdrop=hf_config.get("attn_pdrop", 0.1),
        resid_pdrop=hf_config.get("resid_pdrop", 0.1),
        initializer_range=hf_config.get("initializer_range", 0.02),
        num_labels=hf_config.get("num_labels", len(hf_config.get("id2label", {})) or 2),
        eos_token_id=eos,
        pad_token_id=eos if pad is None else pad,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self, head: str = "score") -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a GPT2ForSequenceClassification
    (``head="score"``) or a GPT2LMHeadModel (``head="lm"``)."""
    return {
        "architectures": ["GPT2ForSequenceClassification" if head == "score"
                          else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": self.vocab_size,
        "n_positions": self.n_positions,
        "n_ctx": self.n_positions,
        "n_embd": self.n_embd,
        "n_layer": self.n_layer,
        "n_head": self.n_head,
        "n_inner": self.n_inner,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "embd_pdrop": self.embd_pdrop,
        "attn_pdrop": self.attn_pdrop,
        "resid_pdrop": self.resid_pdrop,
        "summary_first_dropout": 0.1,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.eos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "num_labels": self.num_labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(self.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(self.num_labels)},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


