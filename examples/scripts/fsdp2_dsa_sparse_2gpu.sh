#!/usr/bin/env bash
# 20 optimizer steps of the dsa-sparse stage on 2 GPUs with FSDP2: the 1.8B-parameter model of
# examples/configs/model_1b.json (random init; same architecture as Keye-VL-2.0 with 6 decoder layers, 32 experts,
# a 4-layer vision tower), 32K-token packed sequences of examples/data/train.jsonl, Triton DSA kernels.
# Writes the per-step JSON log to $LOG (default examples/results/pretrain_fsdp2_2gpu.json). Extra arguments go to
# pretrain.py. Run from the repository root:  bash examples/scripts/fsdp2_dsa_sparse_2gpu.sh
set -euo pipefail
LOG=${LOG:-examples/results/pretrain_fsdp2_2gpu.json}
RUN_DIR=${RUN_DIR:-/tmp/keye_fsdp2_run}
source examples/scripts/offline_env.sh  # carried wheels, import shim (offline machines)
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
python3 -m accelerate.commands.launch --config_file examples/configs/fsdp2.yaml examples/pretrain.py \
  --model_config examples/configs/model_1b.json --stage dsa-sparse --train_file examples/data/train.jsonl \
  --max_seq_len 32768 --max_steps 20 --learning_rate 3e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 2 \
  --cache_samples 64 --report_to tensorboard --output_dir "$RUN_DIR" --log_json "$LOG" "$@"
