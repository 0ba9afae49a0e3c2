#!/usr/bin/env bash
# GSPO on one H200: Video-RL (20 steps, the 1.79B-parameter model of examples/configs/model_1b.json, generated
# grounding / needle tasks, DSA rollouts) and Context-RL at 32K context (key chains and mention counts). A random
# model gets reward 0 on every task (every group would be dropped), so a short supervised warm-up on the generated
# tasks' canonical answers comes first (TimeLens and Video-R1 also start RL from an SFT model). JSON logs go to $OUT
# (default outputs/rl_h200). Run from the repository root:  bash examples/scripts/rl_h200.sh   (about 5-6 minutes;
# each stage capped by `timeout`).
set -uo pipefail
OUT=${OUT:-outputs/rl_h200}
WORK=${WORK:-/tmp/rl_h200}
# (overridable for a dry run on a small machine)
MODEL_CONFIG=${MODEL_CONFIG:-examples/configs/model_1b.json}
CTX=${CTX:-32768}
LAUNCH=${LAUNCH:-"accelerate launch --config_file examples/configs/single_gpu.yaml"}
ATTN=${ATTN:-dsa}
SFT_STEPS=${SFT_STEPS:-48}
VIDEO_STEPS=${VIDEO_STEPS:-20}
CONTEXT_STEPS=${CONTEXT_STEPS:-4}
source examples/scripts/offline_env.sh  # carried wheels, import shim (offline machines)
mkdir -p "$OUT" "$WORK"
python3 examples/make_rl_tasks.py --output_dir "$WORK/tasks" --seed 0 --num_grounding 64 --num_multi_grounding 0 \
    --num_needle 24 --num_context 4 --context_lengths "$CTX" --sft
# 1) warm-up: one sample a step (video tasks and the long-context tasks), dense attention as pretrain's "full" stage
python3 - "$WORK/tasks" <<'PY'
import random, sys
d = sys.argv[1]
lines = open(f"{d}/video_sft.jsonl").readlines() + open(f"{d}/context_sft.jsonl").readlines()
random.Random(0).shuffle(lines)
open(f"{d}/sft.jsonl", "w").writelines(lines)
PY
timeout 120 $LAUNCH examples/pretrain.py --stage full --model_config "$MODEL_CONFIG" \
    --train_file "$WORK/tasks/sft.jsonl" --max_seq_len $((CTX + 4096)) --no_pack --gradient_checkpointing \
    --max_steps "$SFT_STEPS" --learning_rate 2e-4 --warmup_steps 4 --per_device_batch_size 1 --report_to none \
    --output_dir "$WORK/sft" --log_json "$OUT/rl_sft_warmup.json" 2>&1 | tail -3
# 2) Video-RL: vision frozen (features reused across the G completions and the 2 optimiser steps per generation)
timeout 170 $LAUNCH examples/rl.py --mode video --model_name_or_path "$WORK/sft/final" --attn_implementation "$ATTN" \
    --train_file "$WORK/tasks/video.jsonl" --max_steps "$VIDEO_STEPS" --steps_per_generation 2 --num_generations 8 \
    --prompts_per_step 4 --max_new_tokens 24 --learning_rate 2e-6 --per_device_batch_size 16 --report_to none \
    --save_final false --output_dir "$WORK/video_rl" --log_json "$OUT/rl_video_h200.json" 2>&1 | tail -3
# 3) Context-RL at $CTX tokens: chunked log-probs, gradient checkpointing, one completion per micro-batch
timeout 150 $LAUNCH examples/rl.py --mode context --model_name_or_path "$WORK/sft/final" --attn_implementation "$ATTN" \
    --train_file "$WORK/tasks/context.jsonl" --context_curriculum "$((CTX + 4096))" --max_steps "$CONTEXT_STEPS" \
    --num_generations 4 --prompts_per_step 1 --max_draw_rounds 1 --max_new_tokens 16 --gradient_checkpointing \
    --per_device_batch_size 1 --logprob_chunk_size 1024 --learning_rate 1e-6 --report_to none --save_final false \
    --output_dir "$WORK/context_rl" --log_json "$OUT/rl_context_32k_h200.json" 2>&1 | tail -3
