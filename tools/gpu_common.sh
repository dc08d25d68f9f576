# Shared by tools/gpu_check.sh and tools/gpu_peers.sh (sourced, not run): the carried wheels and
# Debian packages, the report's header and the step runner. The caller sets DIR, TITLE and SCRIPT.
# What travels (tools/gpu_carry.sh makes both folders here, where PyPI and Debian are reachable):
#   .whl/  wheels for Python 3.12 manylinux x86_64, installed into /tmp/fuyou-site;
#   .deb/  Debian packages (libaio1, libaio-dev: DeepSpeed's async_io compiles and links against them),
#          unpacked into /tmp/fuyou-deb (never into /) and put on CPATH, LIBRARY_PATH and LD_LIBRARY_PATH.
set -u
mkdir -p "$DIR"
REPORT="$DIR/report.md"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fuyou-site .whl/*.whl \
    && export PYTHONPATH="/tmp/fuyou-site${PYTHONPATH:+:$PYTHONPATH}" && export PATH="/tmp/fuyou-site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .deb/*.deb >/dev/null 2>&1; then
  for f in .deb/*.deb; do dpkg -x "$f" /tmp/fuyou-deb; done
  LIB=/tmp/fuyou-deb/usr/lib/x86_64-linux-gnu
  export CPATH="/tmp/fuyou-deb/usr/include${CPATH:+:$CPATH}" LIBRARY_PATH="$LIB${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

{
  echo "# $TITLE ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "\`bash $SCRIPT\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
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
        print(f"{name} MISSING ({type(e).__name__}): carry its wheel in .whl/ (tools/gpu_carry.sh)")
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
