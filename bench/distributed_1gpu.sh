#!/usr/bin/env bash
# One GPU, torchrun + DeepSpeed ZeRO-2 and ZeRO-3: a random Qwen2.5-0.5B-shaped policy on RouteWorld with a
# forced turn schedule (random weights never write tags), 2 steps, then a resume to step 3.
# Writes $OUT/distributed_1gpu/<stage>/{metrics.jsonl,run.log}. Usage: OUT=dir bash bench/distributed_1gpu.sh
# SHAPE=3b STAGES="zero3 zero3_offload" runs the Qwen2.5-3B shape instead, for the memory table (needs an
# H200): 2 steps, no checkpoints (a 3B actor + critic checkpoint with Adam state is about 90 GB).
set -uo pipefail
OUT=${OUT:-runs/bench}
STAGES=${STAGES:-zero2 zero3}
if [ "${SHAPE:-0.5b}" = 3b ]; then
  SHAPE="model.init={hidden_size: 2048, num_hidden_layers: 36, num_attention_heads: 16, num_key_value_heads: 2, intermediate_size: 11008, max_position_embeddings: 2048, tie_word_embeddings: true}"
  SIZES=(rollout.n_prompts=16 algorithm.minibatch_size=8 model.gradient_checkpointing=true save_every=0 save_final=false)
  RUNS=(${STEPS:-2})
else
  SHAPE="model.init={hidden_size: 896, num_hidden_layers: 24, num_attention_heads: 14, num_key_value_heads: 2, intermediate_size: 4864, max_position_embeddings: 2048, tie_word_embeddings: true}"
  SIZES=(rollout.n_prompts=64 algorithm.minibatch_size=32 save_every=1)
  RUNS=(2 3)
fi
COMMON=(model.dtype=bfloat16 sft.enabled=false "rollout.forced_turns=[8,40]" rollout.forced_answer_at=64
        episode.max_response_tokens=96 "${SIZES[@]}" eval_every=0 task.n_test=64 keep_checkpoints=1)
read -ra EXTRA <<< "${EXTRA_ARGS:-}"  # more overrides, e.g. EXTRA_ARGS="model.compile_layers=true rollout.pack_sequences=true"
COMMON+=("${EXTRA[@]}")
for stage in $STAGES; do
  dir=/tmp/runs/$stage; mkdir -p "$OUT/distributed_1gpu/$stage"
  for steps in "${RUNS[@]}"; do
    resume=(); [ "$steps" = 3 ] && resume=(--resume)
    /usr/bin/time -v torchrun --standalone --nproc_per_node 1 train.py "${resume[@]}" deepspeed=$stage run_dir=$dir \
      "$SHAPE" "${COMMON[@]}" total_steps=$steps >> "$OUT/distributed_1gpu/$stage/run.log" 2>&1
    echo "$stage steps=$steps rc=$?" | tee -a "$OUT/distributed_1gpu/$stage/run.log"
  done
  cp $dir/metrics.jsonl $dir/results.md "$OUT/distributed_1gpu/$stage/" 2>/dev/null
  rm -rf $dir
done
