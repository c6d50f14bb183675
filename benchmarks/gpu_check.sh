#!/usr/bin/env bash
# The GPU check: `benchmarks/gpu_check.sh DIR [options of softmoe bench gpu]` writes DIR/gpu.json
# and DIR/gpu.md (about 8 minutes on one H100/H200). Needs nothing from the network.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: benchmarks/gpu_check.sh DIR [--compile] [--smoke --device cpu] [--peak-tflops T --peak-gbs G]" >&2
  exit 2
fi
out=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python -m softmoe bench gpu --out "$out" "$@"
