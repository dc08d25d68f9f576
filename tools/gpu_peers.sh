#!/usr/bin/env bash
# fuyou against the DeepSpeed peers on one CUDA GPU (issues 8, 16, 19), in about 8 minutes; a second
# run beside tools/gpu_check.sh (each fits the device tool's 10-minute command). It runs:
#   1. DeepSpeed's two ops (cpu_adam, async_io), compiled on first use, built and timed up front;
#   2. bench/vs_zero_infinity.py --device cuda on an SSD-bound configuration (GPT-3 760M, batch 1 x 128,
#      3 GiB): fuyou with fp32 state, fuyou with optim.master=bf16 optim.moments=int8, ZeRO-Infinity
#      (parameters and optimizer state on NVMe), in-memory PyTorch: issue 19's >= 2x and >= 5x, issue 8's
#      >= 2x;
#   3. bench/lora_bench.py: fuyou LoRA over a streamed base against DeepSpeed ZeRO-3 (parameters on
#      NVMe) + PEFT LoRA and fuyou's full fine-tuning (Llama-shaped 501M, batch 8 x 1024): issue 16's >= 3x;
# and writes DIR/report.md (default DIR: gpu-peers-<date>-<time>). Usage, from the repository root:
#   bash tools/gpu_carry.sh          # here, where PyPI and Debian are reachable: fills .whl/ and .deb/
#   bash tools/gpu_peers.sh [DIR]    # there, with .whl and .deb carried (device tool: DIR=$OUT/gp)
DIR=${1:+$(realpath -m "$1")}  # a DIR given relative is the caller's, not the repository's
cd "$(dirname "$0")/.."
DIR=${DIR:-gpu-peers-$(date +%Y%m%d-%H%M%S)}
TITLE="fuyou against the DeepSpeed peers on a GPU" SCRIPT="tools/gpu_peers.sh $*"
source tools/gpu_common.sh

if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  say "" "**stopped**: deepspeed does not import; carry its wheel (tools/gpu_carry.sh)."
  exit 2
fi
SSD=$(mktemp -d /tmp/fuyou-gpu-peers-XXXX)
mkdir -p "$SSD"/{vs,lora}
step "DeepSpeed ops build" 180 "$PY" - <<'PYEOF'
import time
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
for b in (CPUAdamBuilder(), AsyncIOBuilder()):
    if not b.is_compatible(verbose=True):
        raise SystemExit(f"{b.name} cannot be built here (libaio carried in .deb/?)")
    t = time.perf_counter()
    b.load(verbose=False)
    print(f"{b.name}: ready in {time.perf_counter() - t:.0f} s")
PYEOF
step "vs ZeRO-Infinity, SSD-bound, GPT-3 760M" 260 "$PY" bench/vs_zero_infinity.py --device cuda --ds-python "$PY" \
  --model gpt3-760m --batch 1 --seq 128 --ssd "$SSD/vs" --cpu-mem 3GiB --policy auto --steps 3 --warmup 1 --repeats 1 \
  --data synthetic --timeout 200 --fuyou-variant bf16/int8=optim.master=bf16,optim.moments=int8 --markdown "$DIR/vs.md"
step "LoRA vs ZeRO-3 NVMe + PEFT, 501M" 150 "$PY" bench/lora_bench.py --ds-python "$PY" --batch 8 --seq 1024 \
  --cpu-mem 768MiB --full-cpu-mem 2GiB --ssd "$SSD/lora" --steps 3 --warmup 1 --repeats 1 --timeout 120 \
  --markdown "$DIR/lora.md"
rm -rf "$SSD"
finish
