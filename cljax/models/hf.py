"""Hugging Face interop: config, tokenizer and weights in and out.

Weights are matched by one declarative rule (``hf_name``) that maps every cljax
parameter path to its transformers name, so that loading and saving are the same
table read in two directions. Anything unmatched is an error that lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from collections.abc import Mapping

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from cljax import models as model_lib
from cljax.models import GPT2LM, GPT2Classifier, GPT2Config
from cljax.models import families, scan

PREFIX = "transformer."

# cljax path -> transformers name, applied in order (see ``hf_name``).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^h_(\d+)/", r"h.\1."),
    (r"/(kernel|scale|embedding)$", r".weight"),
    (r"/bias$", r".bias"),
    (r"/", r"."),
)
# Parameters stored transposed in transformers (nn.Linear is (out, in); Conv1D and
# Flax's Dense are both (in, out)).
_TRANSPOSED = ("score/kernel",)
# Checkpoint entries that are not parameters of a classifier: the causal-mask
# buffers of older GPT-2 checkpoints and a language-model head tied to ``wte``.
_IGNORED = (r"^h\.\d+\.attn\.(bias|masked_bias)$", r"^lm_head\.weight$")
HEAD = "score/kernel"

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hf_name(path: str) -> str:
  """The transformers tensor name (without ``transformer.``) of a cljax param path."""
  for pattern, repl in _RENAMES:
    path = re.sub(pattern, repl, path)
  return path


def flatten(params: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Flattens a nested params dict to ``{"h_0/attn/c_attn/kernel": leaf}``."""
  return traverse_util.flatten_dict(params, sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep=sep)


# ----------------------------------------------------------------------------
# Locating and reading checkpoints
# ----------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
  """A hub id is 'name' or 'org/name'; anything else is meant as a local path."""
  return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)


def resolve(name_or_path: str, allow_patterns: list[str] | None = None) -> str:
  """A local folder for ``name_or_path``: itself if it is a folder, else a hub download."""
  path = os.path.expanduser(str(name_or_path))
  if os.path.isdir(path):
    return path
  if _looks_like_path(str(name_or_path)):
    raise FileNotFoundError(
        f"{name_or_path!r} is not a folder. Pass a folder holding config.json and "
        "model.safetensors (or pytorch_model.bin), or a Hugging Face hub id such as 'gpt2'.")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return huggingface_hub.snapshot_download(repo_id=str(name_or_path),
                                             allow_patterns=allow_patterns)
  except Exception as e:  # offline, unknown repo, gated repo, ...
    raise OSError(
        f"Could not fetch {name_or_path!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}). If this machine is offline, download the model "
        "elsewhere (for example `huggingface-cli download gpt2`) and pass the local "
        "folder holding config.json and model.safetensors or pytorch_model.bin.") from e


def _read_safetensors(filename: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  out = {}
  try:  # The "flax" framework reads bfloat16 too; convert to float32 numpy on the host.
    with safe_open(filename, framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
  except Exception as e:  # SafetensorError, a short read: the file is damaged
    raise ValueError(f"{filename} does not read as safetensors ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); it is probably truncated: "
                     "download or export it again.") from None
  return out


def weight_files(folder: str) -> list[str]:
  """The weights files of a checkpoint folder that :func:`read_state_dict` reads, in
  the order it reads them: ``model.safetensors``, else the shards its index lists,
  else ``pytorch_model.bin``."""
  single = os.path.join(folder, "model.safetensors")
  index = os.path.join(folder, "model.safetensors.index.json")
  torch_bin = os.path.join(folder, "pytorch_model.bin")
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    with open(index) as f:
      return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  if os.path.exists(torch_bin):
    return [torch_bin]
  raise FileNotFoundError(
      f"No weights in {folder!r}: expected one of {', '.join(WEIGHT_FILES)}; found "
      f"{sorted(os.listdir(folder))}.")


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder as float32 numpy arrays, keyed by HF name."""
  files = weight_files(folder)
  if files[0].endswith(".bin"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"{files[0]} is a PyTorch checkpoint and reading it needs torch "
                        "(pip install torch), or convert it to model.safetensors.") from e
    sd = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  out: dict[str, np.ndarray] = {}
  for name in files:
    out.update(_read_safetensors(name))
  return out


def weights_sha256(name_or_path: str) -> str:
  """The SHA-256 of a checkpoint's weights files (:func:`weight_files`, their bytes one
  after another): which weights a run started from. For one ``model.safetensors`` it
  is that file's ``sha256sum``."""
  digest = hashlib.sha256()
  for path in weight_files(_checkpoint_folder(name_or_path)[0]):
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def merge_weights(state_dict: Mapping[str, np.ndarray], target_shapes: Mapping[str, Any],
                  fresh_params: Mapping[str, Any] | None = None,
                  ignore: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
  """Maps a transformers state dict onto cljax param paths, checking every shape.

  Args:
    state_dict: tensors by transformers name, with or without ``transformer.``.
    target_shapes: flat ``{path: ShapeDtypeStruct}`` from ``jax.eval_shape``.
    fresh_params: flat initial params used for the head when the checkpoint has no
      ``score`` of the right shape.
    ignore: patterns of further checkpoint names that are not parameters here.

  Returns:
    (flat params, list of paths that were freshly initialized).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped tensor.
  """
  sd = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state_dict.items()}
  used, missing, mismatched, fresh = set(), [], [], []
  out = {}
  for path, target in target_shapes.items():
    name = hf_name(path)
    value = sd.get(name)
    if value is not None and path in _TRANSPOSED:
      value = value.T
    if path == HEAD and (value is None or value.shape != tuple(target.shape)):
      why = ("not in the checkpoint" if value is None
             else f"of shape {value.shape}, not {tuple(target.shape)}")
      logging.warning("Classification head 'score' is %s: initializing it freshly "
                      "(normal, std = initializer_range).", why)
      used.add(name)
      fresh.append(path)
      out[path] = fresh_params[path]
      continue
    if value is None:
      missing.append(f"{name} (expected shape {tuple(target.shape)})")
      continue
    used.add(name)
    if value.shape != tuple(target.shape):
      mismatched.append(f"{name}: checkpoint {value.shape}, model {tuple(target.shape)}")
      continue
    out[path] = jnp.asarray(value, dtype=target.dtype)
  extra = [k for k in sd if k not in used and not any(re.match(p, k) for p in
                                                       _IGNORED + tuple(ignore))]
  if missing or extra or mismatched:
    lines = ["The checkpoint does not match the GPT-2 classifier built from its config:"]
    for title, items in (("missing", missing), ("unexpected", extra),
                         ("mis-shaped", mismatched)):
      if items:
        lines.append(f"  {len(items)} {title}: " + "; ".join(sorted(items)))
    lines.append("Check that the folder holds a GPT-2 checkpoint whose config.json "
                 "matches its weights.")
    raise ValueError("\n".join(lines))
  return out, fresh


def _checkpoint_folder(name_or_path: str) -> tuple[str, str]:
  """(folder, its config.json) of a hub id or a local folder holding weights."""
  folder = resolve(name_or_path, ["config.json", "*.safetensors",
                                  "model.safetensors.index.json"])
  if not any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES):
    if not os.path.isdir(os.path.expanduser(str(name_or_path))):
      folder = resolve(name_or_path, ["config.json", "pytorch_model.bin"])
  config_file = os.path.join(folder, "config.json")
  if not os.path.exists(config_file):
    raise FileNotFoundError(f"No config.json in {folder!r}; a Hugging Face GPT-2 folder "
                            "holds config.json next to its weights.")
  return folder, config_file


def model_type(name_or_path: str) -> str:
  """The ``model_type`` of a checkpoint's ``config.json`` (one cljax implements)."""
  return _family_config(_checkpoint_folder(name_or_path)[1])["model_type"]


def _family_config(config_file: str) -> dict:
  """``config.json`` as a dict, its ``model_type`` one cljax implements."""
  with open(config_file) as f:
    hf_config = json.load(f)
  families.check_supported(hf_config.get("model_type"))
  return hf_config


def _check_tied(state_dict: Mapping[str, np.ndarray], folder: str) -> None:
  """An ``lm_head.weight`` in the checkpoint must be ``wte`` (GPT-2 ties them)."""
  head = state_dict.get("lm_head.weight")
  wte = state_dict.get(PREFIX + "wte.weight", state_dict.get("wte.weight"))
  if head is not None and wte is not None and not np.array_equal(head, wte):
    raise ValueError(f"{folder}: lm_head.weight differs from transformer.wte.weight; cljax's "
                     "GPT-2 ties its LM head to wte (tie_word_embeddings=True) and cannot "
                     "load an untied head.")


def load_lm(name_or_path: str, *, dtype: str = "float32", **config_overrides
            ) -> tuple[GPT2LM, dict]:
  """Loads GPT-2 as a language model from a hub id or a local folder (a Llama-family
  or GPT-NeoX folder, by ``config.json``'s ``model_type``: that family's ``*ForCausalLM``,
  :mod:`cljax.models.families`).

  A ``GPT2LMHeadModel`` checkpoint (``lm_head.weight`` tied to ``wte`` or absent),
  or any GPT-2 trunk (``GPT2Model``, a classifier: its ``score`` is not loaded); the
  LM head is the tied ``wte``. Returns ``(model, params)`` with
  ``model.apply({"params": params}, input_ids, attention_mask)`` -> float32 logits
  ``[batch, seq, vocab]``, equal to transformers' ``GPT2LMHeadModel``.
  """
  folder, config_file = _checkpoint_folder(name_or_path)
  hf_config = _family_config(config_file)
  if hf_config["model_type"] != "gpt2":
    return families.load(hf_config, read_state_dict(folder), folder, head="lm", dtype=dtype,
                         **config_overrides)
  config = GPT2Config.from_hf(hf_config, dtype=dtype, **config_overrides)
  model = GPT2LM(config)
  state_dict = read_state_dict(folder)
  _check_tied(state_dict, folder)
  flat, _ = merge_weights(state_dict, flatten(model_lib.param_shapes(scan.per_block(model))),
                          ignore=(r"^score\.weight$",))
  logging.info("Loaded %d tensors from %s as a language model.", len(flat), folder)
  return model, scan.as_layout(unflatten(flat), config)


def load_pretrained(name_or_path: str, *, num_labels: int, dtype: str = "float32",
                    seed: int = 0, **config_overrides) -> tuple[GPT2Classifier, dict]:
  """Loads a GPT-2 classifier from a hub id or a local Hugging Face folder (a
  Llama-family or GPT-NeoX folder, by ``config.json``'s ``model_type``: that family's
  ``*ForSequenceClassification``, :mod:`cljax.models.families`).

  Args:
    name_or_path: a hub id ("gpt2") or a folder with ``config.json`` and
      ``model.safetensors`` (single or sharded) or ``pytorch_model.bin``.
    num_labels: size of the classification head.
    dtype: compute dtype ("float32" or "bfloat16"); params are stored in float32.
    seed: seed of the fresh head, when the checkpoint has none of the right shape.
    **config_overrides: further ``GPT2Config`` fields (``remat=True``, dropout, ...).

  Returns:
    (model, params) with ``model.apply({"params": params}, input_ids, ...)``.
  """
  folder, config_file = _checkpoint_folder(name_or_path)
  hf_config = _family_config(config_file)
  if hf_config["model_type"] != "gpt2":
    return families.load(hf_config, read_state_dict(folder), folder, head="classifier",
                         num_labels=num_labels, dtype=dtype, seed=seed, **config_overrides)
  config = GPT2Config.from_hf(hf_config, num_labels=num_labels, dtype=dtype,
                              **config_overrides)
  model = GPT2Classifier(config)
  targets = model_lib.param_shapes(scan.per_block(model))
  state_dict = read_state_dict(folder)
  _check_tied(state_dict, folder)
  fresh_head = {HEAD: jax.jit(
      lambda k: jax.random.normal(k, targets["score"]["kernel"].shape)
      * config.initializer_range)(jax.random.key(seed))}
  flat, fresh = merge_weights(state_dict, flatten(targets), fresh_head)
  logging.info("Loaded %d tensors from %s%s.", len(flat) - len(fresh), folder,
               " (fresh classification head)" if fresh else "")
  return model, scan.as_layout(unflatten(flat), config)


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------

def save_pretrained(params: Mapping[str, Any], config: GPT2Config, folder: str, *,
                    head: str | None = None) -> None:
  """Writes a Hugging Face folder that transformers loads with the same logits.

  ``head="score"``: a ``GPT2ForSequenceClassification`` (keys ``transformer.*`` and
  ``score.weight``); ``head="lm"``: a ``GPT2LMHeadModel`` (keys ``transformer.*``; its
  ``lm_head`` is tied to ``wte``). Default: ``score`` when the params have one.
  ``config.json`` and ``model.safetensors`` (float32).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  params, config = scan.plain_layout(params, config), config.replace(scan_layers=False)
  if not isinstance(config, GPT2Config):   # a Llama-family or GPT-NeoX config
    return families.save(params, config, folder, head or ("score" if "score" in params
                                                          else "lm"))
  if config.has_peft:
    raise ValueError("These params hold LoRA, adapters, soft prompts, PNN columns or DEN "
                     "units, which a plain Hugging Face folder cannot; merge LoRA first "
                     "(cljax.models.merge_lora).")
  head = head or ("score" if "score" in params else "lm")
  if head not in ("score", "lm"):
    raise ValueError(f"head={head!r}: expected 'score' or 'lm'.")
  if head == "score" and "score" not in params:
    raise ValueError("head='score' but the params have no score head; export with head='lm'.")
  flat = {p: v for p, v in flatten(params).items() if head == "score" or p != HEAD}
  os.makedirs(folder, exist_ok=True)
  tensors = {}
  for path, value in flat.items():
    value = np.asarray(jax.device_get(value), dtype=np.float32)
    if path in _TRANSPOSED:
      value = value.T
    name = hf_name(path)
    tensors[name if path == HEAD else PREFIX + name] = np.ascontiguousarray(value)
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_hf(head), f, indent=2)


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

# A tokenizer folder holds one of these sets of files.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _folder_tokenizer_class(path: str):
  """The transformers tokenizer class a local folder names (its
  ``tokenizer_config.json``'s ``tokenizer_class``, the fast one where there is one;
  without it, ``PreTrainedTokenizerFast`` over ``tokenizer.json`` or GPT-2's BPE
  files), taken by name: ``AutoTokenizer``'s import pulls in torch (seconds of
  start-up that a JAX run does not need)."""
  import transformers  # pylint: disable=import-outside-toplevel
  name = None
  config = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(config):
    with open(config, encoding="utf-8") as f:
      name = json.load(f).get("tokenizer_class")
  if not name:
    name = ("PreTrainedTokenizerFast" if os.path.exists(os.path.join(path, "tokenizer.json"))
            else "GPT2TokenizerFast")
  for candidate in ((name,) if name.endswith("Fast") else (name + "Fast", name)):
    try:
      return getattr(transformers, candidate)
    except Exception:  # pylint: disable=broad-except  # not in this transformers
      continue
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer


def load_tokenizer(name_or_path: str):
  """A Hugging Face tokenizer with pad = eos and right padding.

  Loads a folder with the class its ``tokenizer_config.json`` names (no torch import)
  and a hub id with ``AutoTokenizer.from_pretrained``; this avoids
  transformers 5's ``GPT2TokenizerFast(vocab_file=..., merges_file=...)``, which
  silently encodes everything to ``[]``.
  """
  path = os.path.expanduser(str(name_or_path))
  if not os.path.isdir(path):
    if _looks_like_path(str(name_or_path)):
      raise FileNotFoundError(f"Tokenizer folder {name_or_path!r} does not exist.")
  elif not any(all(os.path.exists(os.path.join(path, f)) for f in files)
               for files in TOKENIZER_FILES):
    raise FileNotFoundError(
        f"Tokenizer folder {name_or_path!r} holds no tokenizer: expected tokenizer.json, or "
        f"vocab.json and merges.txt; found {sorted(os.listdir(path))[:10]}.")
  try:
    if os.path.isdir(path):
      tok = _folder_tokenizer_class(path).from_pretrained(path)
    else:
      from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
      tok = AutoTokenizer.from_pretrained(str(name_or_path))
  except OSError as e:
    raise OSError(f"Could not load a tokenizer from {name_or_path!r} ({e}). Offline, pass "
                  "a local folder holding vocab.json and merges.txt (or tokenizer.json).") from e
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError(f"The tokenizer {name_or_path!r} has neither a pad nor an end-of-text "
                       "token; give it a pad token (tokenizer.json's special tokens).")
    tok.pad_token = tok.eos_token
    logging.info("The tokenizer has no pad token: rows are right-padded with its end-of-text "
                 "token %r (id %d), and a classifier pools at each row's last token that is "
                 "not it.", tok.eos_token, tok.eos_token_id)
  tok.padding_side = "right"
  if not tok("hello world")["input_ids"]:
    raise ValueError(f"The tokenizer loaded from {name_or_path!r} encodes 'hello world' "
                     "to no tokens; its vocabulary files were not read.")
  return tok
