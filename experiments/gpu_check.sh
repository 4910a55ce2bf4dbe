#!/usr/bin/env bash
# The prepared check for a lent GPU (the workplace's device tool): one call of about
# 9 minutes (513 s on an H100). Prepare here, once, from the repository root:
#   mkdir -p .devdata && cp -r ../shared/data ../shared/gpt2-tokenizer .devdata/
#   printf '/.devdata/\n/.whl/\n' >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl datasets dill multiprocess   # optional
# then: run(command="bash experiments/gpu_check.sh", carry=[".devdata", ".whl"],
#           timeout_s=560)
# The machine's image has JAX, flax, optax, orbax, torch, transformers and accelerate;
# wheels under .whl (the seed script's `datasets`) are installed first when present,
# and without `datasets` the Trainer reads the same rows from a list.
# It prints (and writes under $OUT, stage by stage) JSON lines:
#   1. GPT-2 small, sequence 128, batch 256, bfloat16: train/eval examples/s, MFU, and
#      transformers' PyTorch model with the same config and optimizer (autocast bf16);
#   2. the seed-size study (2 x 2000 training examples, 500 test, every evaluation,
#      random-init GPT-2 small, batch 8) end to end in cljax and in the seed's own
#      script (transformers' Trainer, the same rows and recipe), in one process;
#   3. cljax's study again in a fresh process with the XLA and token caches of 2 warm
#      (a rerun or a sweep's next run), timed from the shell;
#   4. greedy generation, GPT-2 small, batch 64, 64-token prompts, 128 new tokens:
#      cljax.generate against transformers' generate (same weights, same tokens);
#   5. the step benchmark at batch 512 (JAX alone), for MFU at a larger batch;
#   6. (not in the default stages: STAGES=6, about 6 minutes, a second call) the
#      compile time of one bfloat16 train program against a minimal Flax GPT-2 of the
#      same computation, with the default GPU autotuning and with
#      --xla_gpu_autotune_level=0; how long a task-boundary checkpoint of GPT-2 small
#      blocks training against the time its write takes; and the step at batch $BATCH
#      without attention dropout, with XLA's attention and with cuDNN's fused kernel
#      (--attention=cudnn), for MFU with and without attention dropout (stage 1).
#   7. (not in the default stages: STAGES=7, a call of its own) 5 seeds of the
#      seed-size study, one after another in one process and side by side
#      (--parallel_runs=5), both with --dropout_rng_impl=threefry, timed from the shell
#      (compare with 5 x stage 2's Trainer time).
#   8. (not in the default stages: STAGES=8, about 6 minutes) Llama-3.2-1B's shape
#      (random init: grouped-query, 128k vocabulary, llama3 RoPE), sequence 128, batch
#      $LLAMA_BATCH, bfloat16: the train and eval steps against transformers'
#      LlamaForSequenceClassification with the same config and optimizer; then the
#      seed-size study on that shape (GPT-2's vocabulary: the study's tokenizer) in
#      cljax and in the seed's Trainer script with transformers' Llama, one process.
# Stage 3's results.json counts the programs compiled and loaded (a warm rerun should
# compile none) and those built after the first step.
# Smaller settings through the environment (a CPU smoke run of the script itself):
#   SIZE=tiny BATCH=8 BIG_BATCH=16 NUM_TRAIN=32 NUM_TEST=16 bash experiments/gpu_check.sh
#   STAGES=8 LLAMA_SIZE=tiny LLAMA_BATCH=8 bash experiments/gpu_check.sh
# and STAGES="2 3" runs only those stages (the versions always print).
set -uo pipefail
STAGES=" ${STAGES:-1 2 3 4 5} "
want() { [[ $STAGES == *" $1 "* ]]; }
SIZE=${SIZE:-gpt2} BATCH=${BATCH:-256} BIG_BATCH=${BIG_BATCH:-512}
LLAMA_SIZE=${LLAMA_SIZE:-llama-3.2-1b} LLAMA_BATCH=${LLAMA_BATCH:-32}
NUM_TRAIN=${NUM_TRAIN:-2000} NUM_TEST=${NUM_TEST:-500} DTYPE=${DTYPE:-bfloat16}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# JAX and PyTorch share the GPU in stages 1, 2 and 4: JAX takes 45% up front, not 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
site=""
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl && site=/tmp/gpu_check_site
fi
export PYTHONPATH=$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
stage() { echo "[$(date +%T)] $*"; }
study_flags=(--init=random --size="$SIZE" --data_dir=.devdata/data
  --tokenizer=.devdata/gpt2-tokenizer --num_train="$NUM_TRAIN" --num_test="$NUM_TEST"
  --batch_size=8 --eval_batch_size=64 --dtype="$DTYPE" --learning_rate=5e-5 --epochs=1
  --warmup_steps=0)

stage "0 versions"
nvidia-smi -L 2>/dev/null
python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import importlib, jax
print(jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "torch",
             "accelerate", "datasets", "tokenizers", "numpy"):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as e:  # report, carry on
    print(name, "unavailable:", type(e).__name__, e)
EOF

if want 1; then
stage "1 step benchmark, batch $BATCH"
timeout 150 python3 experiments/benchmark.py --size="$SIZE" --seq_len=128 \
  --batch_size="$BATCH" --dtype="$DTYPE" --steps=20 --warmup=3 --compare_torch \
  --output="$out/bench.jsonl" 2>&1 | tail -3
fi
if want 2; then
stage "2 study: cljax then the seed's Trainer script, one process"
rm -rf /tmp/vs_torch
JAX_LOG_COMPILES=1 timeout 240 python3 experiments/study_vs_torch.py "${study_flags[@]}" \
  --workdir=/tmp/vs_torch > "$out/study.log" 2>&1
grep '^{' "$out/study.log" | tail -1 | tee "$out/study.jsonl"
tail -2 "$out/study.log"
fi
if want 3; then
stage "3 study again, warm caches, fresh process"
rm -rf /tmp/vs_torch_warm
t0=$(date +%s.%N)
timeout 120 python3 experiments/forgetting.py "${study_flags[@]}" --checkpoint_every=0 \
  --cache_dir=/tmp/vs_torch/token_cache --workdir=/tmp/vs_torch_warm > "$out/warm.log" 2>&1
rc=$?
t1=$(date +%s.%N)
python3 - "$rc" "$t0" "$t1" <<'EOF' | tee "$out/warm.jsonl"
import json, sys
rc, t0, t1 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
out = {"rc": rc, "jax_warm_wall_seconds_from_shell": t1 - t0}
try:   # a run that failed wrote none
  r = json.load(open("/tmp/vs_torch_warm/results.json"))
  out.update(accuracy_matrix=r["accuracy_matrix"], timing=r["timing"])
except OSError as e:
  out["error"] = str(e)
print(json.dumps(out))
EOF
fi
if want 4; then
stage "4 generation"
timeout 90 python3 experiments/benchmark.py --size="$SIZE" --batch_size=64 --seq_len=64 \
  --generate_tokens=128 --compare_torch --output="$out/generate.jsonl" 2>&1 | tail -1
fi
if want 5; then
stage "5 step benchmark, batch $BIG_BATCH, JAX alone"
timeout 90 python3 experiments/benchmark.py --size="$SIZE" --seq_len=128 \
  --batch_size="$BIG_BATCH" --dtype="$DTYPE" --steps=20 --warmup=3 \
  --output="$out/bench_big.jsonl" 2>&1 | tail -1
fi
if want 6; then
stage "6 compile of one train program against a minimal GPT-2, default and lower autotuning"
timeout 150 python3 experiments/benchmark.py --size="$SIZE" --compile_overhead \
  --compile_dtypes="$DTYPE" --compile_repeats=1 \
  --output="$out/compile_overhead.jsonl" 2>&1 | tail -1
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout 150 python3 \
  experiments/benchmark.py --size="$SIZE" --compile_overhead --compile_dtypes="$DTYPE" \
  --compile_repeats=1 --output="$out/compile_overhead_autotune0.jsonl" 2>&1 | tail -1
timeout 90 python3 experiments/benchmark.py --size="$SIZE" --checkpoint_overhead \
  --batch_size=8 --steps=20 --output="$out/checkpoint_overhead.jsonl" 2>&1 | tail -1
for attention in xla cudnn; do
  timeout 90 python3 experiments/benchmark.py --size="$SIZE" --seq_len=128 \
    --batch_size="$BATCH" --dtype="$DTYPE" --steps=20 --warmup=3 --attn_pdrop=0 \
    --attention="$attention" --output="$out/bench_no_attn_dropout.jsonl" 2>&1 | tail -1
done
fi
if want 7; then
stage "7 five seeds of the seed-size study: one after another, then side by side"
for mode in one_after_another side_by_side; do
  rm -rf "/tmp/seeds_$mode"
  extra=(); [[ $mode == side_by_side ]] && extra=(--parallel_runs=5)
  t0=$(date +%s.%N)
  timeout 280 python3 experiments/sweep.py "${study_flags[@]}" --checkpoint_every=0 \
    --methods=finetune --seeds=0,1,2,3,4 --dropout_rng_impl=threefry "${extra[@]}" \
    --root="/tmp/seeds_$mode" --report=false > "$out/seeds_$mode.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  python3 - "$mode" "$rc" "$t0" "$t1" <<'EOF' | tee -a "$out/seeds.jsonl"
import glob, json, sys
mode, rc, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
runs = [json.load(open(p)) for p in sorted(glob.glob(f"/tmp/seeds_{mode}/*/*/seed*/results.json"))]
print(json.dumps({"mode": mode, "rc": rc, "wall_seconds_from_shell": t1 - t0,
                  "runs": len(runs), "matrices": [r["accuracy_matrix"] for r in runs]}))
EOF
done
fi
if want 8; then
stage "8 Llama-3.2-1B's shape: the step against transformers', batch $LLAMA_BATCH"
timeout 240 python3 experiments/benchmark.py --arch=llama --size="$LLAMA_SIZE" \
  --seq_len=128 --batch_size="$LLAMA_BATCH" --dtype="$DTYPE" --steps=10 --warmup=2 \
  --compare_torch --output="$out/bench_llama.jsonl" 2>&1 | tail -1
rm -rf /tmp/vs_torch_llama
timeout 300 python3 experiments/study_vs_torch.py "${study_flags[@]}" --arch=llama \
  --size="$LLAMA_SIZE" --workdir=/tmp/vs_torch_llama > "$out/study_llama.log" 2>&1
grep '^{' "$out/study_llama.log" | tail -1 | tee "$out/study_llama.jsonl"
tail -2 "$out/study_llama.log"
fi
stage "done"
