#!/usr/bin/env bash
# The prepared check for a lent GPU (the workplace's device tool): one call of about
# 9 minutes. Prepare here, once, from the repository root:
#   mkdir -p .devdata && cp -r ../shared/data ../shared/gpt2-tokenizer .devdata/
#   echo /.devdata/ >> .git/info/exclude
# then: run(command="bash experiments/gpu_check.sh", carry=[".devdata"], timeout_s=590)
# It prints (and writes under $OUT) JSON lines:
#   1. GPT-2 small, sequence 128, batch 256, bfloat16: train/eval examples/s, MFU, and
#      transformers' PyTorch model with the same config and optimizer (autocast bf16);
#   2. the seed-size study (2 x 2000 training examples, every evaluation, random-init
#      GPT-2 small) end to end in cljax and in the seed's own script (transformers'
#      Trainer, the same rows and recipe), in one process, and the ratio;
#   3. greedy generation, GPT-2 small, batch 64, 64-token prompts, 128 new tokens:
#      cljax.generate against transformers' generate (same weights, same tokens).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi -L
python3 -c "import jax; print(jax.__version__, jax.devices())"
timeout 170 python3 experiments/benchmark.py --size=gpt2 --seq_len=128 --batch_size=256 \
  --dtype=bfloat16 --steps=20 --warmup=3 --compare_torch --output="$out/bench.jsonl" 2>&1 | tail -1
timeout 330 python3 experiments/study_vs_torch.py --init=random --size=gpt2 \
  --data_dir=.devdata/data --tokenizer=.devdata/gpt2-tokenizer --num_train=2000 \
  --num_test=500 --batch_size=8 --eval_batch_size=64 --dtype=bfloat16 \
  --learning_rate=5e-5 --epochs=1 --warmup_steps=0 --workdir=/tmp/vs_torch \
  --torch_loop 2>&1 | tail -1 | tee -a "$out/study.jsonl"
timeout 90 python3 experiments/benchmark.py --size=gpt2 --batch_size=64 --seq_len=64 \
  --generate_tokens=128 --compare_torch --output="$out/generate.jsonl" 2>&1 | tail -1
