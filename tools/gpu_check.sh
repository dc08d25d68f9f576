#!/usr/bin/env bash
# The one GPU check (issue 15). On a machine with one CUDA GPU, in about 4 minutes (3.6 on an H200), it runs:
#   1. pytest -m gpu: the engine on CUDA against the reference for every activation tier and clipping
#      mode, kvikio, pinned-memory registration, the device and CPU budgets with 1 and 4 micro-batches,
#      a block's and the head's peak allocation against the plan (tests/engine/test_cuda.py,
#      tests/engine/test_working_set.py, tests/store/test_kvikio.py);
#   2. one traced training step (fuyou train --trace) of GPT-3 125M, and a LoRA run of it;
#   3. the engine benchmark on GPT-3 1.3B with a 24 GiB GPU budget (TFLOPS, GPU busy fraction);
#   4. bench/planner_validation.py --device cuda (one configuration);
#   5. the kvikio I/O benchmark (bench/io_bench.py), when kvikio is importable;
# and writes one markdown report, DIR/report.md (default DIR: gpu-check-<date>-<time>), beside the
# logs and the trace. Usage, from the repository root:
#   bash tools/gpu_check.sh [DIR]          # on the device tool: bash tools/gpu_check.sh $OUT/gc
#
# The device machine may have no package registry. torch with CUDA must be there. fuyou's other
# dependencies and the optional kvikio travel as wheels in .whl/ at the repository root, which
# `bash tools/gpu_carry.sh` fills where PyPI is reachable (tools/gpu_common.sh installs them first).
# What is missing is skipped and named in the report. The DeepSpeed peers on the GPU:
# tools/gpu_peers.sh, a second run.
DIR=${1:+$(realpath -m "$1")}  # a DIR given relative is the caller's, not the repository's
cd "$(dirname "$0")/.."
DIR=${DIR:-gpu-check-$(date +%Y%m%d-%H%M%S)}
TITLE="fuyou GPU check" SCRIPT="tools/gpu_check.sh $*"
source tools/gpu_common.sh

SSD=$(mktemp -d /tmp/fuyou-gpu-check-XXXX)
mkdir -p "$SSD"/{trace,lora,bench,val,dp,io}  # fuyou train refuses an SSD directory that does not exist
step "pytest -m gpu" 240 "$PY" -m pytest -m gpu -q -rfE --timeout 90 -p no:cacheprovider tests/engine/test_cuda.py \
  tests/engine/test_working_set.py tests/store/test_kvikio.py
step "one traced step" 60 "$PY" -m fuyou.cli train --offload ssd --ssd "$SSD/trace" --out "$SSD/runs" --model gpt3-125m \
  --trace "$DIR/trace.json" train.device=cuda train.steps=3 data.source=synthetic data.seq_len=1024 \
  train.micro_batch_size=8 offload.cpu_mem=16GiB run.save_weights=false train.eval_every=0
step "one LoRA step" 60 "$PY" -m fuyou.cli train --offload ssd --ssd "$SSD/lora" --out "$SSD/runs" --model gpt3-125m \
  train.device=cuda train.steps=4 data.source=synthetic data.seq_len=1024 train.micro_batch_size=8 \
  offload.cpu_mem=16GiB run.save_weights=false train.eval_every=0 lora.rank=16 lora.targets=all-linear
step "engine benchmark, GPT-3 1.3B, 24 GiB GPU budget" 140 "$PY" bench/engine_bench.py --ssd "$SSD/bench" \
  --configs gpu-1.3b --steps 2 --warmup 1 --repeats 1 --io-bytes 1GiB
step "planner validation on cuda" 100 "$PY" bench/planner_validation.py --device cuda --ssd "$SSD/val" \
  --configs "$("$PY" -c 'import sys; sys.path.insert(0, "bench"); import planner_validation as p; print(next(iter(p.CONFIGS)))')" \
  --steps 2 --repeats 1 --io-bytes 512MiB
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step "data parallel, 2 GPUs (NCCL) vs 1" 240 "$PY" bench/dp_bench.py --ssd "$SSD/dp" --ranks 2 --device cuda \
    --precision bf16 --layers 8 --width 1024 --batch 4 --seq 512 --accum 2 --steps 4 --repeats 1 --cpu-mem 16GiB --cache
else
  say "" "## data parallel on GPUs: skipped (one GPU; NCCL needs one per rank)"
fi
if "$PY" -c "import kvikio" 2>/dev/null; then
  step "kvikio io_bench" 40 "$PY" bench/io_bench.py --dir "$SSD/io" --size 1GiB --reps 3 --gpu --no-deepspeed
else
  say "" "## kvikio io_bench: skipped (kvikio is not importable; carry kvikio and libkvikio wheels in .whl/)"
fi
rm -rf "$SSD"
finish
