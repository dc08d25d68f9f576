# Shared by tools/gpu_check.sh and tools/gpu_peers.sh (sourced, not run): the carried wheels and
# Debian packages, the report's header and the step runner. The caller sets DIR, TITLE and SCRIPT.
# What travels (tools/gpu_carry.sh makes both folders here, where PyPI and Debian are reachable):
#   .whl/  wheels for Python 3.12 manylinux x86_64, installed into /tmp/fuyou-site;
#   .deb/  Debian packages (libaio1, libaio-dev: DeepSpeed's async_io compiles and links against them),
#          unpacked into /tmp/fuyou-deb (never into /) and put on CPATH, LIBRARY_PATH and LD_LIBRARY_PATH.
# The report is written as it goes, to DIR/report.md and to stdout, so that a run killed at the device
# tool's limit still returns what it did (give DIR under the tool's $OUT). Every step's time limit is cut
# to what is left before GPU_DEADLINE seconds (default 570) from the start; a step with no time left is
# skipped and named. The script exits 1 when a step failed or was skipped.
set -u
mkdir -p "$DIR"
REPORT="$DIR/report.md"
PY=${PYTHON:-python3}
DEADLINE=${GPU_DEADLINE:-570}
FAILED=0
export PYTHONUNBUFFERED=1
: > "$REPORT"

# say TEXT...: append to the report and print.
say() { printf '%s\n' "$@" | tee -a "$REPORT"; }

SETUP=""
if ls .whl/*.whl >/dev/null 2>&1; then
  pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fuyou-site "$@"; }
  if ! pipi .whl/*.whl > "$DIR/setup.log" 2>&1; then  # all or nothing: one unusable wheel stops the rest
    for w in .whl/*.whl; do
      pipi "$w" >> "$DIR/setup.log" 2>&1 || SETUP="$SETUP
- wheel not installed: $(basename "$w") (see setup.log; this Python: $("$PY" -c 'import platform; print(platform.python_version())'))"
    done
  fi
  export PYTHONPATH="/tmp/fuyou-site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/fuyou-site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .deb/*.deb >/dev/null 2>&1; then
  for f in .deb/*.deb; do
    dpkg -x "$f" /tmp/fuyou-deb >> "$DIR/setup.log" 2>&1 || SETUP="$SETUP
- package not unpacked: $(basename "$f") (see setup.log)"
  done
  LIB=/tmp/fuyou-deb/usr/lib/x86_64-linux-gnu
  export CPATH="/tmp/fuyou-deb/usr/include${CPATH:+:$CPATH}" LIBRARY_PATH="$LIB${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

say "# $TITLE ($(date -u '+%Y-%m-%d %H:%M UTC'))" "" \
    "\`bash $SCRIPT\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" "" '```'
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  "$PY" - <<'PYEOF' 2>&1
import importlib, os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}, {os.cpu_count()} CPUs")
for name in ("pydantic", "safetensors", "numpy", "kvikio", "deepspeed", "transformers", "peft", "pytest",
             "pytest_timeout"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name} MISSING ({type(e).__name__}: {e}): carry its wheel in .whl/ (tools/gpu_carry.sh)")
PYEOF
} | tee -a "$REPORT"
say '```'
[ -n "$SETUP" ] && say "$SETUP"

if ! "$PY" -c "import torch, pydantic, safetensors, numpy" >> "$REPORT" 2>&1; then
  say "**stopped**: torch and fuyou's dependencies must import (see above; tools/gpu_carry.sh carries the wheels)."
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >> "$REPORT" 2>&1; then
  say "**stopped**: no CUDA GPU here (torch $("$PY" -c 'import torch; print(torch.__version__)') sees none): run this on the GPU machine."
  exit 2
fi

# step NAME TIMEOUT COMMAND...: run one part within the deadline, record its exit status and the tail
# of its output (the whole output in DIR/NAME.log).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    say "" "## $name: SKIPPED (past the ${DEADLINE} s deadline; run it alone)"
    FAILED=$((FAILED + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$DIR/$(echo "$name" | tr -c 'A-Za-z0-9._\n-' '_').log" t0=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
  say "" "## $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ", timed out at $limit s"))") in $((SECONDS - t0)) s" \
      "" "\`$*\`" "" '```'
  tail -n 40 "$log" | tee -a "$REPORT"
  say '```'
  return 0
}

# finish: the report's last line and the exit status (1 when a step failed or was skipped).
finish() {
  say "" "$FAILED step(s) failed or skipped. Record the figures in bench/RESULTS.md with this report's header."
  exit $((FAILED > 0))
}
