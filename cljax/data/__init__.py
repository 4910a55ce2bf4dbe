"""Tasks, label remapping, seeded subsets, tokenization and fixed-shape batches.

A task's examples flow: rows ``{"text", "label"}`` (from the hub through
``datasets`` or from local JSONL / CSV / Parquet files) -> the task's selected
classes, remapped onto the shared head after the previous tasks' labels -> a
seeded subset -> ``int32`` arrays of fixed length -> batches of fixed shape whose
last one is padded and masked (``weights`` 0), never dropped.

One step per module, every public name re-exported here (``data_lib.batches``):

- ``tasks``: the known datasets and local tasks, ``resolve_tasks`` (classes onto the
  shared head), label words and their tokens (classification as text).
- ``files``: reading rows from JSONL / JSON / CSV / Parquet and text files, checked.
- ``subsets``: a split's rows from the hub or ``--data_dir``, labels checked; the
  seeded ``balanced`` / ``head`` subsets, without a base model's pretraining texts.
- ``provenance``: text keys by content, the fixed part of a file LM pretraining
  keeps, and the keys a pretrained model's folder lists.
- ``arrays``: tokenization (cached by content), a subset's ``int32`` arrays,
  ``TaskData`` and ``load_task_data``, which runs the steps above for every task.
- ``batching``: fixed-shape batches and length buckets.
"""

from cljax.data.arrays import (TaskData, class_warnings, concat, load_task_data, make_arrays,
                               size, tokenize)
from cljax.data.batching import (SEQUENCE_GROUPS, batches, eval_batches, length_buckets,
                                 num_batches, one_batch_per_shape, row_lengths,
                                 sort_by_length, trim_to_bucket)
from cljax.data.files import (SUFFIXES, Row, check_row, find_split_file, read_json_records,
                              read_rows, read_text)
from cljax.data.provenance import in_fraction, read_keys, text_key, write_keys
from cljax.data.subsets import Subsets, load_hub_rows, load_rows, select, task_subsets
from cljax.data.tasks import (TASKS, Task, TaskSpec, answer_tokens, label_tokens,
                              local_task_spec, num_labels, resolve_tasks)

__all__ = [
    "SEQUENCE_GROUPS", "SUFFIXES", "TASKS", "Row", "Subsets", "Task", "TaskData",
    "TaskSpec", "answer_tokens", "batches", "check_row", "class_warnings", "concat",
    "eval_batches", "find_split_file", "in_fraction", "label_tokens", "length_buckets",
    "load_hub_rows", "load_rows", "load_task_data", "local_task_spec", "make_arrays",
    "num_batches", "num_labels", "one_batch_per_shape", "read_json_records", "read_keys",
    "read_rows", "read_text", "resolve_tasks", "row_lengths", "select", "size",
    "sort_by_length", "task_subsets", "text_key", "tokenize", "trim_to_bucket",
    "write_keys",
]
