#!/bin/sh
# SiRA mixture (4 LoRA experts of rank 2, top-2 routing with capacity 1.25, gate dropout, load-balancing and
# z-losses) against plain LoRA r10 at the same trainable-parameter budget on query/value of MiniLM: per layer
# LoRA r10 has 10·(384+384) = 7680 parameters, the mixture 4·2·(384+384) + 4·384 (router) = 7680. Both train the
# classifier head too (modules_to_save). Demo tweets (3 classes), one epoch; prints test accuracy and time.
set -e
cd "$(dirname "$0")/../.."
GRAFT=${GRAFT:-.build/release/graft}
[ -x "$GRAFT" ] || swift build -c release --product graft
for cfg in lora_r10 sira_4x2; do
  echo "== $cfg"
  "$GRAFT" train --config bench/sira-vs-lora/$cfg.json "$@"
done
