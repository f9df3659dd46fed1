#!/bin/sh
# Install torch into a venv without pulling CUDA wheels onto a machine that has no GPU.
#
#   tools/install_torch.sh PYTHON VERSION FLAVOR [INDEX]
#
# FLAVOR cpu (make's default): the CPU build from PyTorch's CPU wheel index (INDEX,
#   default https://download.pytorch.org/whl/cpu) when that index answers; when it does
#   not (an offline machine, a machine that reaches only a PyPI mirror), plain
#   `pip install torch==VERSION`, which then takes what pip's configured sources have
#   (a local CPU wheel via find-links, a mirror). On PyPI itself that fallback is the
#   CUDA build on Linux: the message says so.
# FLAVOR cuda: `pip install torch==VERSION` from PyPI (its Linux wheels are CUDA
#   builds), or from INDEX when given (e.g. https://download.pytorch.org/whl/cu128).
set -eu
PY=$1
VERSION=$2
FLAVOR=${3:-cpu}
INDEX=${4:-}

reachable() {
    # One HEAD-less GET of the index page, 5 s at most; honours HTTPS_PROXY like pip.
    "$PY" - "$1" <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except Exception as e:
    print(f"  ({type(e).__name__}: {e})", file=sys.stderr)
    sys.exit(1)
PYEOF
}

case "$FLAVOR" in
cpu)
    INDEX=${INDEX:-https://download.pytorch.org/whl/cpu}
    if reachable "$INDEX"; then
        echo "install_torch: CPU build of torch $VERSION from $INDEX"
        exec "$PY" -m pip install -q --index-url "$INDEX" "torch==$VERSION"
    fi
    echo "install_torch: $INDEX is not reachable; falling back to 'pip install torch==$VERSION'" \
         "(pip's configured sources: a local CPU wheel or a mirror; from PyPI on Linux this is the CUDA build)"
    exec "$PY" -m pip install -q "torch==$VERSION"
    ;;
cuda)
    if [ -n "$INDEX" ]; then
        echo "install_torch: torch $VERSION from $INDEX"
        exec "$PY" -m pip install -q --index-url "$INDEX" "torch==$VERSION"
    fi
    echo "install_torch: torch $VERSION from PyPI (CUDA build on Linux)"
    exec "$PY" -m pip install -q "torch==$VERSION"
    ;;
*)
    echo "install_torch: TORCH must be cpu or cuda, got '$FLAVOR'" >&2
    exit 2
    ;;
esac
