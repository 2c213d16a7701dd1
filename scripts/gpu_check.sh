#!/usr/bin/env bash
# `make gpu-check OUT=DIR`: install what the project needs from its own files, then run
# scripts/gpu_check.py (serving on CUDA, MFU, the study if time is left); results in
# DIR/gpu_check.json. Meant for one lent GPU: the whole run stays inside 9 minutes.
#   scripts/gpu_check.sh DIR [--dry-run] [gpu_check.py options]
# PYTHON: the interpreter that holds the machine's CUDA torch (default python3); it is never
# replaced: constraints.txt's torch pin is left out of the install.
# PIXTOK_WHEELS: a folder of wheels to install from (a machine that reaches no index).
# PIXTOK_GPU_CHECK_INSTALL=0: skip the install (the dry run in `make test` does).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [options]}
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
PY=${PYTHON:-python3}
start=$(date +%s)
if [ "${PIXTOK_GPU_CHECK_INSTALL:-1}" != 0 ]; then
  grep -v '^torch==' constraints.txt > "$out/constraints-without-torch.txt"
  extra=gpu
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || extra=serve
  echo "gpu-check: installing .[$extra] (constraints.txt less its torch pin)"
  # shellcheck disable=SC2086
  if ! timeout 240 "$PY" -m pip install -q --no-build-isolation \
      ${PIXTOK_WHEELS:+--no-index --find-links "$PIXTOK_WHEELS"} \
      -c "$out/constraints-without-torch.txt" -e ".[$extra]" >"$out/install.log" 2>&1; then
    echo "gpu-check: the install failed (see $out/install.log); going on with what is there"
  fi
fi
left=$((540 - ($(date +%s) - start)))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the budget left after the install; timeout's margin lets the script write its last JSON
timeout "$((left + 20))" "$PY" scripts/gpu_check.py --out "$out" --budget "$((left - 20))" "$@"
