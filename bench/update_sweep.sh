#!/usr/bin/env bash
# Time DeepSpeed configs for the PPO update, each in a process of its own (DeepSpeed keeps memory after
# its engines are deleted), next to the plain packed step. Packed micro-batches with FlexAttention.
# ENV_PREFIX (e.g. "env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True") and EXTRA (more bench.update flags)
# apply to every process; PLAIN=0 skips the plain row.
# Usage: OUT=dir TOKENS=16384 bash bench/update_sweep.sh configs/deepspeed/zero2.json bench/configs/zero2_overlap.json
set -uo pipefail
OUT=${OUT:-runs/bench}
TOKENS=${TOKENS:-16384}
log=$OUT/update_sweep.txt
if [ "${PLAIN:-1}" = 1 ]; then
  ${ENV_PREFIX:-} python -m bench.update --flex --tokens "$TOKENS" --only "ours, plain PyTorch: packed" --tag plain ${EXTRA:-} 2>&1 \
    | grep -E "^\{|^\||matmul|Error" | tee -a "$log"
fi
for cfg in "$@"; do
  name=$(basename "$cfg" .json)
  ${ENV_PREFIX:-} python -m bench.update --flex --tokens "$TOKENS" --only "$cfg" --ds-configs "$cfg" --tag "$name" ${EXTRA:-} 2>&1 \
    | grep -E "^\{|^\||matmul|Error" | tee -a "$log"
done
