#!/usr/bin/env bash
# The GPU benchmarks, in one go on one card (H100 / H200): the training step at Llama-8B
# scale (d = 4096, 131072 latents, k = 32, 8192-token batches) against EleutherAI
# sparsify, in float32 and with bfloat16 autocast. Results go to BENCHMARKS.md.
#
#   SPARSIFY_SITE=/path/to/site bash bench/gpu.sh
#
# where the site folder holds sparsify and the packages it imports:
#   pip install --no-deps --target SITE eai-sparsify natsort schedulefree simple-parsing docstring_parser accelerate
set -euo pipefail
export PYTHONPATH="${SPARSIFY_SITE:-}${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for flags in "" "--autocast"; do
  python bench/train_step.py --device cuda --d 4096 --latents 131072 --k 32 --tokens 8192 --rounds 5 --no-dense $flags
done
