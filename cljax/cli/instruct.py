r"""Language-model training: Alpaca-style instruction tuning, or plain-text pretraining.

  cljax-instruct --workdir=runs/alpaca --data=alpaca_data.json --model=gpt2 \
      --generate=prompts.txt
  cljax-instruct --workdir=runs/pretrain --data_format=text --data=texts.jsonl \
      --init=random --size=mini --block_size=128
  (or: python experiments/instruct.py ...)

Instruction rows (instruction, optional input, output) get the Stanford Alpaca prompt
templates; only the response and its EOS carry loss. Writes DIR/results.json (held-out
loss and perplexity before and after), metrics.jsonl, TensorBoard scalars, orbax
checkpoints (--resume continues a run exactly), generations.jsonl (--generate) and
hf_model/ (a GPT2LMHeadModel folder transformers loads).
"""

import sys

from absl import flags

from cljax import cli
from cljax.cli import flags as cljax_flags
from cljax.lm import train as lm_train

cljax_flags.define_config_flags(lm_train.LMConfig)
flags.adopt_module_key_flags(cljax_flags)  # --help lists every flag
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run.", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its "
                            "latest checkpoint.")


def main(argv):
  results = cli.checked(argv, lambda: lm_train.run(
      cljax_flags.config_from_flags(lm_train.LMConfig), _WORKDIR.value,
      resume=_RESUME.value, flags=cljax_flags.flag_values()))
  for when in ("before", "after"):
    held = results[f"held_out_{when}"]
    if held:
      print(f"held-out {when} training: loss {held['loss']:.4f}, "
            f"perplexity {held['perplexity']:.2f}")


def run():
  cli.run_main(main, sys.modules[__name__])
