#!/usr/bin/env bash
# The one GPU check (issue 15). On a machine with one CUDA GPU, in about 8 minutes, it runs:
#   1. pytest -m gpu: the engine on CUDA against the reference for every activation tier and clipping
#      mode, kvikio, pinned-memory registration, the device and CPU budgets with 1 and 4 micro-batches,
#      a block's and the head's peak allocation against the plan (tests/engine/test_cuda.py,
#      tests/engine/test_working_set.py, tests/store/test_kvikio.py);
#   2. one traced training step (fuyou train --trace) of GPT-3 125M;
#   3. the engine benchmark on GPT-3 1.3B with a 24 GiB GPU budget (TFLOPS, GPU busy fraction);
#   4. bench/planner_validation.py --device cuda (one configuration);
#   5. the kvikio I/O benchmark (bench/io_bench.py), when kvikio is importable;
# and writes one markdown report, DIR/report.md (default DIR: gpu-check-<date>-<time>), beside the
# logs and the trace. Usage, from the repository root:
#   bash tools/gpu_check.sh [DIR]
#
# The device machine may have no package registry. torch with CUDA must be there. fuyou's other
# dependencies (pydantic, pydantic-core, annotated-types, typing-inspection, safetensors, numpy) and
# the optional kvikio (kvikio-cu12/-cu13 with libkvikio) and deepspeed (built for CUDA) travel as
# wheels: put them in .whl/ at the repository root (pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION; see the README's
# development section); this script installs them into /tmp/fuyou-site first. What is missing is
# skipped and named in the report.
set -u
cd "$(dirname "$0")/.."
DIR=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DIR"
REPORT="$DIR/report.md"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fuyou-site .whl/*.whl \
    && export PYTHONPATH="/tmp/fuyou-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# fuyou GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "\`bash tools/gpu_check.sh $*\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  "$PY" - <<'PYEOF' 2>&1
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
for name in ("pydantic", "safetensors", "numpy", "kvikio", "deepspeed", "pytest", "pytest_timeout"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} MISSING ({type(e).__name__}): carry its wheel in .whl/")
PYEOF
  echo '```'
} > "$REPORT"

if ! "$PY" -c "import torch, pydantic, safetensors, numpy; assert torch.cuda.is_available()" 2>>"$REPORT"; then
  echo "**stopped**: torch with CUDA and fuyou's dependencies must import (see above)." >> "$REPORT"
  cat "$REPORT"
  exit 2
fi

# step NAME TIMEOUT COMMAND...: run one part, record its exit status and the tail of its output.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$DIR/$(echo "$name" | tr -c 'A-Za-z0-9._\n-' '_').log" t0=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  {
    echo
    echo "## $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))") in $((SECONDS - t0)) s"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    tail -n 40 "$log"
    echo '```'
  } >> "$REPORT"
  return 0
}

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
  printf '\n## data parallel on GPUs: skipped (one GPU; NCCL needs one per rank)\n' >> "$REPORT"
fi
if "$PY" -c "import kvikio" 2>/dev/null; then
  step "kvikio io_bench" 40 "$PY" bench/io_bench.py --dir "$SSD/io" --size 1GiB --reps 3 --gpu --no-deepspeed
else
  printf '\n## kvikio io_bench: skipped (kvikio is not importable; carry kvikio and libkvikio wheels in .whl/)\n' >> "$REPORT"
fi
rm -rf "$SSD"
echo >> "$REPORT"
echo "Record the figures in bench/RESULTS.md with this report's header." >> "$REPORT"
cat "$REPORT"
