#!/usr/bin/env bash
# The interventions demo on the shipped model (CPU, about 30 s after training):
# find the features behind "talking about threads" with a contrast search, then ablate
# and steer them while the model writes, and measure the effect and its cost.
# Options given to the script go to both fix-tests after the defaults here, e.g.
#   bash scripts/demo_interventions.sh --samples 2 --max-new-tokens 8   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=checkpoints/demo
P=configs/prompts
[ -f "$RUN/layers.2/cfg.json" ] || python train.py configs/demo.yaml   # the demo SAE (about 2 minutes)

echo "== 1. contrast: sentences about threads vs the same sentences about files"
python analyze.py search "$RUN" --target "$P/demo_threads.txt" --baseline "$P/demo_files.txt" --top 5

echo "== 2. ablate the top 8 contrast features: do continuations of thread prompts mention threads less?"
python analyze.py fix-test "$RUN" --prompts "$P/demo_thread_prompts.txt" --scorer "words:$P/demo_thread_words.txt" \
    --contrast "$P/demo_threads.txt" "$P/demo_files.txt" --ablate-top 8 --samples 8 --max-new-tokens 24 \
    --html "$RUN/fix-ablate.html" "$@"

echo "== 3. steer the top 2 contrast features by +4: more?"
python analyze.py fix-test "$RUN" --prompts "$P/demo_thread_prompts.txt" --scorer "words:$P/demo_thread_words.txt" \
    --contrast "$P/demo_threads.txt" "$P/demo_files.txt" --steer-top 2:+4 --samples 8 --max-new-tokens 24 \
    --html "$RUN/fix-steer.html" "$@"
echo "pages with samples: $RUN/fix-ablate.html, $RUN/fix-steer.html"
