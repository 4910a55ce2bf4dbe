"""Language-model data: the Stanford Alpaca prompt templates and instruction rows
(prompt masked out of the loss), plain text packed into blocks, the files and hub
datasets they are read from, and prompts to answer."""

from __future__ import annotations

import os

from absl import logging
import numpy as np

from cljax import data as data_lib

# Stanford Alpaca's prompt templates (tatsu-lab/stanford_alpaca, train.py).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def read_records(source: str) -> list[tuple[dict, str]]:
  """(row, where) pairs of a .json list, a .jsonl file or a hub dataset's train split;
  ``where`` ("file:line") names the row in errors."""
  path = os.path.expanduser(source)
  if os.path.isfile(path):
    return data_lib.read_json_records(path)
  if os.path.exists(path) or source.startswith((".", "/", "~")):
    raise FileNotFoundError(f"{source}: not a file; expected a .json or .jsonl file or a "
                            "Hugging Face hub dataset id.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
    ds = datasets.load_dataset(source, split="train")
  except Exception as e:  # offline, unknown id
    raise OSError(f"Could not load {source!r} from the Hugging Face hub ({type(e).__name__}:"
                  f" {e}). Offline, pass a local .json / .jsonl file.") from e
  return [(row, f"hub:{source}:{i}") for i, row in enumerate(ds)]


def alpaca_prompt(row: dict, where: str = "") -> str:
  """The Stanford Alpaca prompt of a row (with or without its ``input``)."""
  for key in ("instruction",) + (("input",) if row.get("input") else ()):
    if not isinstance(row.get(key), str):
      raise ValueError(f"{where}: {key!r} must be a string, found {row.get(key)!r:.60}.")
  if row.get("input"):
    return PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
  return PROMPT_NO_INPUT.format(instruction=row["instruction"])


def alpaca_arrays(records, tokenizer, max_length: int) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on the response and its
  EOS only) of Alpaca rows, truncated to ``max_length`` and right padded."""
  n = len(records)
  ids = np.full((n, max_length), tokenizer.pad_token_id, np.int32)
  mask, loss = np.zeros((n, max_length), np.int32), np.zeros((n, max_length), np.int32)
  cut = 0
  for i, (row, where) in enumerate(records):
    if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
      raise ValueError(f"{where}: expected an object with 'instruction' and 'output' (and "
                       f"optionally 'input'), found {str(row)[:80]!r}.")
    if not isinstance(row["output"], str):
      raise ValueError(f"{where}: 'output' must be a string, found {row['output']!r:.60}.")
    prompt = alpaca_prompt(row, where)
    source = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + row["output"] + tokenizer.eos_token)["input_ids"][:max_length]
    cut += len(source) >= len(full)
    ids[i, :len(full)] = full
    mask[i, :len(full)] = 1
    loss[i, len(source):len(full)] = 1
  if cut:
    logging.warning("%d of %d examples have no response token left within --max_length=%d "
                    "(their prompts fill it); they carry no loss.", cut, n, max_length)
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def text_arrays(records, tokenizer, block_size: int, field: str = "text"
                ) -> dict[str, np.ndarray]:
  """Every row's text plus EOS, concatenated and cut into full blocks of
  ``block_size`` tokens (the remainder is dropped), every token a target."""
  texts = []
  for row, where in records:
    text = row.get(field) if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{where}: expected a non-empty string field {field!r}.")
    texts.append(text)
  stream = [t for ids in tokenizer(texts, verbose=False)["input_ids"]
            for t in (*ids, tokenizer.eos_token_id)]
  blocks = len(stream) // block_size
  if blocks == 0:
    raise ValueError(f"The data holds {len(stream)} tokens, less than one --block_size="
                     f"{block_size} block.")
  ids = np.asarray(stream[:blocks * block_size], np.int32).reshape(blocks, block_size)
  ones = np.ones_like(ids)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def read_sources(sources: str) -> list[tuple[dict, str]]:
  """The rows of one source or of several joined by commas, in order."""
  return [r for source in sources.split(",") if source.strip()
          for r in read_records(source.strip())]


def row_text(row, data_format: str, field: str = "text") -> str | None:
  """What a row is, as one text: its ``field``, or an Alpaca row's prompt and output
  (rows may share an instruction and still differ); None where it has none."""
  if not isinstance(row, dict):
    return None
  if data_format == "text":
    return row.get(field) if isinstance(row.get(field), str) else None
  if not all(isinstance(row.get(k, ""), str) for k in ("instruction", "input", "output")):
    return None
  return "\n\n".join((row.get("instruction", ""), row.get("input", ""), row.get("output", "")))


def row_keys(row, data_format: str, field: str = "text") -> list[str]:
  """The text key of a row (:func:`cljax.data.provenance.text_key` of
  :func:`row_text`), as a list (empty where the row has no text)."""
  text = row_text(row, data_format, field)
  return [] if text is None else [data_lib.text_key(text)]


def read_part(sources: str, fractions: tuple[float, ...], data_format: str,
              field: str = "text") -> list[tuple[dict, str]]:
  """The rows of ``sources`` (joined by commas); with ``fractions`` (one, or one per
  source) only the fixed part of each source whose text key falls below its fraction
  (:func:`cljax.data.provenance.in_fraction`: the same rows in every run)."""
  names = [s.strip() for s in sources.split(",") if s.strip()]
  if fractions and len(fractions) not in (1, len(names)):
    raise ValueError(f"--data_fraction has {len(fractions)} values for {len(names)} --data "
                     "sources; give one for all, or one per source.")
  out = []
  for i, source in enumerate(names):
    rows = read_records(source)
    if fractions:
      f = fractions[i if len(fractions) > 1 else 0]
      rows = [r for r in rows if (text := row_text(r[0], data_format, field)) is not None
              and data_lib.in_fraction(text, f)]
      logging.info("%s: kept the fixed %.0f %% part by content, %d rows.", source, 100 * f,
                   len(rows))
    out.extend(rows)
  return out


def drop_texts(records: list, keys: frozenset[str], data_format: str, field: str,
               what: str) -> list:
  """``records`` without the rows that share a text with ``keys`` (logged)."""
  kept = [r for r in records if not set(row_keys(r[0], data_format, field)) & keys]
  if len(kept) < len(records):
    logging.info("Left out %d training rows whose text is in %s.", len(records) - len(kept),
                 what)
  return kept


def sample_records(records: list, n: int | None, seed) -> list:
  """At most ``n`` records, a seeded sample kept in file order (None: all)."""
  if n is None or n >= len(records):
    return records
  return [records[i] for i in sorted(np.random.default_rng(seed).permutation(len(records))[:n])]


def read_prompts(path: str) -> list[dict]:
  """Prompts to answer: JSON Lines rows with ``instruction`` (and ``input``), or a text
  file with one instruction per line."""
  if path.endswith((".jsonl", ".json")):
    return [row for row, _ in read_records(path)]
  return [{"instruction": line} for line in data_lib.read_text(path).splitlines()
          if line.strip()]
