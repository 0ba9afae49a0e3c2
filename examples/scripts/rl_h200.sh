#!/usr/bin/env bash
# GSPO on one H200: Video-RL (>= 20 steps, 1.79B-parameter model of this architecture, generated grounding /
# needle tasks) and Context-RL at 32K context. A random model gets reward 0 on every task (every group would be
# dropped), so a short supervised warm-up on the generated tasks' canonical answers comes first (as TimeLens and
# Video-R1 start RL from an SFT model). Run from the repo root; writes JSON logs under $OUT (default outputs/rl_h200).
# Wall time: about 5-6 minutes (warm-up ~1.5 min, Video-RL ~2 min, Context-RL ~1.5 min; each capped by timeout).
set -uo pipefail
OUT=${OUT:-outputs/rl_h200}
WORK=${WORK:-/tmp/rl_h200}
mkdir -p "$OUT" "$WORK"
python examples/make_rl_tasks.py --output_dir "$WORK/tasks" --seed 0 --num_grounding 64 --num_multi_grounding 0 \
    --num_needle 24 --num_context 4 --context_lengths 32768 --sft 2>&1 | tail -2
# 1) warm-up: 48 steps of supervised training on the answers, one sample a step (video tasks and 32K context tasks;
#    dense attention, as pretrain's "full" stage)
cat "$WORK/tasks/video_sft.jsonl" "$WORK/tasks/context_sft.jsonl" | shuf --random-source=<(yes) > "$WORK/tasks/sft.jsonl"
timeout 110 accelerate launch --config_file examples/configs/single_gpu.yaml examples/pretrain.py --stage full \
    --model_config examples/configs/model_1b.json --train_file "$WORK/tasks/sft.jsonl" --max_seq_len 36864 --no_pack \
    --gradient_checkpointing --max_steps 48 --learning_rate 2e-4 --warmup_steps 4 --per_device_batch_size 1 --report_to none \
    --output_dir "$WORK/sft" --log_json "$OUT/rl_sft_warmup.json" 2>&1 | tail -3
# 2) Video-RL: GSPO, vision frozen (features reused across the G completions and the 2 optimiser steps), DSA rollouts
timeout 170 accelerate launch --config_file examples/configs/single_gpu.yaml examples/rl.py --mode video \
    --model_name_or_path "$WORK/sft/final" --attn_implementation dsa --train_file "$WORK/tasks/video.jsonl" \
    --max_steps 20 --steps_per_generation 2 --num_generations 8 --prompts_per_step 4 --max_new_tokens 24 \
    --temperature 1.0 --learning_rate 2e-6 --per_device_batch_size 16 --report_to none --save_final false \
    --output_dir "$WORK/video_rl" --log_json "$OUT/rl_video_h200.json" 2>&1 | tail -3
# 3) Context-RL at 32K: key chains / mention counts among distractor passages, chunked log-probs, checkpointing
timeout 150 accelerate launch --config_file examples/configs/single_gpu.yaml examples/rl.py --mode context \
    --model_name_or_path "$WORK/sft/final" --attn_implementation dsa --train_file "$WORK/tasks/context.jsonl" \
    --context_curriculum 32768 --max_steps 4 --num_generations 4 --prompts_per_step 1 --max_draw_rounds 1 \
    --max_new_tokens 16 --gradient_checkpointing --per_device_batch_size 1 --logprob_chunk_size 1024 \
    --learning_rate 1e-6 --report_to none --save_final false --output_dir "$WORK/context_rl" \
    --log_json "$OUT/rl_context_32k_h200.json" 2>&1 | tail -3
