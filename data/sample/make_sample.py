"""Writes the quick start's data sample (this folder) from the project's shared data.

  python data/sample/make_sample.py [SOURCE] [--out=DIR]

SOURCE (default: ``../shared/data`` beside the repository) holds ``imdb/`` and
``ag_news/``, each with ``train.jsonl`` and ``test.jsonl``, one
``{"text", "label"}`` object per line. For each file and each label this takes
``PER_LABEL[task][split]`` rows: the label's rows in file order, of which the first
``k`` of ``numpy.random.default_rng((0, label)).permutation(n_label)`` are kept, put
back in source order. The selected lines are copied byte for byte (each is checked to
equal ``json.dumps(row, ensure_ascii=False)``), so the sample keeps the source's row
order: IMDb stays sorted by label, AG News keeps its classes interleaved. Then
``README.md`` is written beside the files (in DIR, default this folder), with the
selected row numbers and the sha256 of every file. Running it again on the same
source gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_SOURCE = os.path.join(ROOT, "..", "shared", "data")

SEED = 0
# Rows per label: IMDb 0 neg, 1 pos; AG News 0 World, 1 Sports, 2 Business, 3 Sci/Tech
# (all four classes, so that other task streams can be built from the sample).
PER_LABEL = {
    "imdb": {"train": {0: 500, 1: 500}, "test": {0: 100, 1: 100}},
    "ag_news": {"train": {0: 500, 1: 500, 2: 500, 3: 500},
                "test": {0: 100, 1: 100, 2: 100, 3: 100}},
}
LABEL_NAMES = {"imdb": ("neg", "pos"), "ag_news": ("World", "Sports", "Business", "Sci/Tech")}


def read_lines(path: str) -> list[tuple[bytes, int]]:
  """(the line's bytes without its newline, its label) per line of a JSONL file."""
  out = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f.read().split(b"\n")):
      if not raw:
        continue
      row = json.loads(raw.decode("utf-8"))
      if set(row) != {"text", "label"} or not isinstance(row["label"], int):
        raise ValueError(f"{path}:{n + 1}: expected {{'text', 'label'}} with an int label.")
      if json.dumps(row, ensure_ascii=False).encode("utf-8") != raw:
        raise ValueError(f"{path}:{n + 1}: the line is not json.dumps(row, "
                         "ensure_ascii=False); copying it byte for byte would differ.")
      out.append((raw, row["label"]))
  return out


def choose(labels: list[int], per_label: dict[int, int]) -> list[int]:
  """Row numbers (0-based, ascending) of ``per_label[label]`` rows of each label."""
  chosen = []
  for label, k in per_label.items():
    rows = [i for i, x in enumerate(labels) if x == label]
    if k > len(rows):
      raise ValueError(f"Label {label}: {k} rows asked, {len(rows)} in the source.")
    pick = np.random.default_rng((SEED, label)).permutation(len(rows))[:k]
    chosen += [rows[j] for j in pick]
  return sorted(chosen)


def sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


README_HEAD = """\
# data/sample: a small real-data sample of IMDb and AG News

The data of the quick start (`experiments/presets/smoke.flags`, `--data_dir=data/sample`):
real rows of the project's IMDb and AG News subsets (`shared/data/`), small enough to
ship in the repository and to train on in about a minute on 2 CPU cores. No text was
changed: every line is a byte-for-byte copy of a line of the source file.

Written by `make_sample.py` in this folder (`python data/sample/make_sample.py
[SOURCE]`, SOURCE default `../shared/data` from the repository root); running it again
on the same source gives the same bytes. This README is written by the same script.

## Format

JSON Lines, UTF-8 (non-ASCII characters written as they are, not `\\u`-escaped), one
`{{"text": <string>, "label": <int>}}` per line, as in the source:

| dataset | label ids |
| --- | --- |
| IMDb | 0 = neg, 1 = pos |
| AG News | 0 = World, 1 = Sports, 2 = Business, 3 = Sci/Tech |

**Row order:** source order. The IMDb files are sorted by label (all neg rows, then all
pos rows), as the source is; AG News keeps its classes interleaved. The study draws
seeded, shuffled, label-balanced subsets (`--subset=balanced`), so the order does not
matter to it; shuffle before training anything else.

## Files

| file | rows | per label | bytes | sha256 |
| --- | --- | --- | --- | --- |
{table}

Total: {total:,} bytes.

## How the rows were selected

For each file and each label, the label's rows are listed in file order and the first
*k* of `numpy.random.default_rng((0, label)).permutation(n_label)` are kept (*k* as in
the table above), then all kept rows are written in source order. Every source line is
checked to equal `json.dumps(row, ensure_ascii=False)` and copied as it is.

The rows taken, as 0-based row numbers (line number minus 1) of the source file of the
same name under `shared/data/`:

{rows}

## Sources and terms

The source files are the project's `shared/data/` subsets; their README gives the full
provenance (repositories, commits, checksums) of every row. In short:

- **IMDb (Task A):** Large Movie Review Dataset v1.0 (`aclImdb`), from Maas, Daly, Pham,
  Huang, Ng and Potts, "Learning Word Vectors for Sentiment Analysis", ACL-HLT 2011,
  pages 142–150. `shared/data/imdb/train.jsonl` holds the reviews with ids 0–4999 of
  `aclImdb/train/neg` then `train/pos`; `test.jsonl` ids 0–2499 of `test/neg` then
  `test/pos`; the text is the review file unchanged (`<br />` kept), the rating dropped.
  **Licence:** the dataset's own README states no licence; it asks users to cite the
  ACL 2011 paper above. The reviews are user-written texts from IMDb, collected by the
  authors.
- **AG News (Task B):** AG's News Topic Classification Dataset, Version 3, built by
  Xiang Zhang from the AG corpus of news articles gathered by ComeToMyHead; the
  benchmark of Zhang, Zhao and LeCun, "Character-level Convolutional Networks for Text
  Classification", NIPS 2015. `text` is `title + " " + description` and
  `label` the class index minus 1, as in the Hugging Face `ag_news` loader; source
  artefacts (`\\\\` for escaped line breaks, `#39;`, `&lt;`) are kept. The train rows
  come from a 5,000-row sample of the official `train.csv`, the test rows from rows
  0–5599 of the official `test.csv`. **Terms:** the dataset's `readme.txt` says "The
  dataset is provided by the academic comunity for research purposes in data mining
  (clustering, classification, etc), information retrieval (ranking, search, etc), xml,
  data compression, data streaming, and any other non-commercial activity." Research
  and non-commercial use only; cite Zhang et al., NIPS 2015.

## Bigger data

`--data_dir` takes any folder with the same layout (`TASK/train.jsonl` and
`TASK/test.jsonl`, or `.json`, `.csv`, `.parquet` with columns `text` and `label`).
With the project's shared data beside the repository,
`--data_dir=../shared/data --num_train=2000 --num_test=500` reproduces the larger smoke
run (`experiments/presets/smoke_shared.flags`); without `--data_dir` the study loads
the Hugging Face hub datasets.
"""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                      help="folder holding imdb/ and ag_news/ (default: ../shared/data "
                           "beside the repository)")
  parser.add_argument("--out", default=HERE,
                      help="where to write the sample (default: this script's folder)")
  args = parser.parse_args(argv)
  table, sections, total = [], [], 0
  for task, splits in PER_LABEL.items():
    for split, per_label in splits.items():
      name = f"{task}/{split}.jsonl"
      lines = read_lines(os.path.join(args.source, task, f"{split}.jsonl"))
      chosen = choose([label for _, label in lines], per_label)
      out = os.path.join(args.out, task, f"{split}.jsonl")
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with open(out, "wb") as f:
        f.write(b"".join(lines[i][0] + b"\n" for i in chosen))
      size = os.path.getsize(out)
      total += size
      counts = " · ".join(f"{label}: {k}" for label, k in per_label.items())
      table.append(f"| `{name}` | {len(chosen):,} | {counts} | {size:,} | `{sha256(out)}` |")
      by_label = "\n".join(
          f"- {label} ({LABEL_NAMES[task][label]}): "
          + ", ".join(str(i) for i in chosen if lines[i][1] == label)
          for label in per_label)
      sections.append(f"<details><summary><code>{name}</code>: {len(chosen):,} rows of "
                      f"{len(lines):,}</summary>\n\n{by_label}\n\n</details>")
      print(f"{name}: {len(chosen)} rows, {size:,} bytes")
  with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
    f.write(README_HEAD.format(table="\n".join(table), total=total,
                               rows="\n\n".join(sections)))
  print(f"total: {total:,} bytes")


if __name__ == "__main__":
  main()
