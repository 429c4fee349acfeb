#!/usr/bin/env bash
# Check this checkout on the GPU machine's software stack, on a CPU:
# torch 2.11.0, triton 3.6.0 and torchvision 0.26.0 (the lent H200's Python packages).
#
#   scripts/check_gpu_stack.sh [DRY_RUN_OUT [DRY_RUN_OPTIONS...]]
#
# 1. creates (once; reused afterwards) a virtualenv with that stack under
#    ${TMPDIR:-/tmp}/convcompiler-stack-torch2.11.0-triton3.6.0-torchvision0.26.0
#    (about 2.5 minutes here; override the place with CONVCOMPILER_STACK_VENV);
# 2. installs this checkout into it (pip install --no-deps -e ., so the im2win entry point
#    is registered, as a user has it);
# 3. imports the package, runs examples/quickstart.py, the static sm_90 gate on resnet18
#    (`convcompiler aot`), and the GPU command's dry run (report in DRY_RUN_OUT, default a
#    temporary directory).
# Exits non-zero at the first step that fails; prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0
TRITON=3.6.0
VISION=0.26.0
VENV="${CONVCOMPILER_STACK_VENV:-${TMPDIR:-/tmp}/convcompiler-stack-torch$TORCH-triton$TRITON-torchvision$VISION}"
OUT="${1:-$(mktemp -d)}"
shift || true  # the rest are options for the dry run (the test passes --limit)
PY="$VENV/bin/python"

step() {  # step NAME COMMAND...: run it, print its wall time
    local name=$1 start=$SECONDS
    shift
    echo "== $name"
    "$@"
    echo "== $name: $((SECONDS - start)) s"
}

create_venv() {
    # One creator at a time; a venv without its .complete marker is rebuilt.
    exec 9>"$VENV.lock"
    flock 9
    if [ ! -f "$VENV/.complete" ]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$PY" -m pip install -q "torch==$TORCH" "triton==$TRITON" "torchvision==$VISION" \
            sympy networkx tqdm numpy pytest
        touch "$VENV/.complete"
    fi
    flock -u 9
}

step "virtualenv $VENV" create_venv
step "install this checkout" "$PY" -m pip install -q --no-deps -e .
step "versions" "$PY" -c "import torch, triton, torchvision, convcompiler
print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__)
assert torch.__version__.startswith('$TORCH') and triton.__version__ == '$TRITON'"
step "quickstart" "$PY" examples/quickstart.py
step "static gate (aot sm_90, resnet18)" \
    "$PY" -m convcompiler aot --arch sm_90 torchvision:resnet18 --input 1,3,64,64
step "GPU command dry run" "$PY" -m convcompiler.bench gpu --dry-run --out "$OUT" "$@"
