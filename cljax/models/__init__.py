"""GPT-2 in Flax Linen, numerically equal to transformers', one job per file:

- ``config.py``: :class:`GPT2Config`, the standard sizes, dtypes, HF ``config.json``.
- ``gpt2.py``: the trunk (embeddings, attention, MLP, blocks) with HF's names.
- ``heads.py``: :class:`GPT2Classifier` (``score``), :class:`GPT2LabelWords`
  (classification as text), :class:`GPT2LM` (tied LM head, KV cache), and
  :data:`MODEL_INPUTS`, the optional inputs a batch may carry into them.
- ``peft.py``: LoRA, adapters and soft prompts in per-task slots.
- ``pnn.py``: Progressive Neural Networks' columns and laterals.
- ``den.py``: Dynamically Expandable Networks' MLP units (capacity, masks, views).
- ``scan.py``: the blocks under ``nn.scan`` (``scan_layers``), their params stacked.
- ``surgery.py``: new token rows, added modules' params, LoRA merging, random init.
- ``minimal.py``: a bare GPT-2 classifier, the compile benchmark's baseline.

This package is the only place that imports ``flax.linen``.
"""

from cljax.models.config import LORA_TARGETS, SIZE_ALIASES, SIZES, GPT2Config, as_dtype
from cljax.models.heads import (MODEL_INPUTS, GPT2Classifier, GPT2LabelWords, GPT2LM,
                                pool_index)
from cljax.models.peft import Adapter, LoRA, Prompts
from cljax.models.pnn import column_prefix
from cljax.models.surgery import (add_method_modules, add_method_tokens, add_peft_params,
                                  add_token_embeddings, init_params, is_peft, merge_lora,
                                  param_shapes, peft_slot_of, random_params)

__all__ = ["LORA_TARGETS", "MODEL_INPUTS", "SIZES", "SIZE_ALIASES", "Adapter", "GPT2Classifier",
           "GPT2Config", "GPT2LM", "GPT2LabelWords", "LoRA", "Prompts", "add_method_modules",
           "add_method_tokens", "add_peft_params", "add_token_embeddings", "as_dtype",
           "column_prefix", "init_params", "is_peft", "merge_lora", "param_shapes",
           "peft_slot_of", "pool_index", "random_params"]
