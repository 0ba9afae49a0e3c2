#!/usr/bin/env bash
# MOPD on one GPU: a 1.8B-parameter student of this architecture (examples/configs/model_1b.json, random init,
# DSA top-k 256 so that the sparse selection is active on the video / OCR prompts of a few hundred tokens), two
# different random teachers (a 1.8B Keye-VL-2.0 for image / OCR / video, a 0.46B text-only Qwen3 for math /
# writing; examples/scripts/make_mopd_teachers.py), teachers offloaded to CPU memory and moved to the GPU one at a
# time, rollouts with the model's generate and the Triton DSA kernels, bf16 autocast, 20 steps, held-out exact KL
# every 5 steps. Writes the JSON log to $LOG (default examples/results/mopd_1gpu.json). Extra arguments go to
# mopd.py. Run from the repository root:  bash examples/scripts/mopd_1gpu.sh      (about 3-4 minutes on an H200)
set -euo pipefail
LOG=${LOG:-examples/results/mopd_1gpu.json}
RUN_DIR=${RUN_DIR:-/tmp/keye_mopd_run}
# (overridable for a dry run on a small machine)
STUDENT_BASE=${STUDENT_BASE:-examples/configs/model_1b.json}
TEXT_CONFIG=${TEXT_CONFIG:-'{"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64}'}
TEACHER_DEVICE=${TEACHER_DEVICE:-cuda}
STEPS=${STEPS:-20}
source examples/scripts/offline_env.sh  # carried wheels, import shim (offline machines)
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
mkdir -p "$RUN_DIR"
python3 - "$STUDENT_BASE" "$RUN_DIR/student.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["sa_config"] = {"indexer_num_heads": 16, "indexer_head_dim": 64, "topk": 256}
json.dump(cfg, open(sys.argv[2], "w"))
PY
python3 examples/scripts/make_mopd_teachers.py --out "$RUN_DIR/teachers" --vision_config "$RUN_DIR/student.json" \
  --text_config "$TEXT_CONFIG" --dtype bfloat16 --device "$TEACHER_DEVICE" --seed 1
python3 examples/mopd.py --model_config "$RUN_DIR/student.json" --teachers "$RUN_DIR/teachers/teachers.json" \
  --train_file examples/data/mopd_train.jsonl --eval_file examples/data/mopd_eval.jsonl --eval_steps 5 \
  --eval_num_prompts 8 --max_steps "$STEPS" --per_device_batch_size 4 --num_generations 4 --max_new_tokens 64 \
  --attn_implementation dsa --mixed_precision bf16 --teacher_dtype bfloat16 --teacher_residency offload \
  --learning_rate 1e-5 --report_to none --save_final false --output_dir "$RUN_DIR/out" --log_json "$LOG" "$@"
