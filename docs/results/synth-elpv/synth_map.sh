#!/usr/bin/env bash
# Issue 22: one synthetic ELPV tree per method (same seed, so the same split), then the map's
# image AUROC, pixel AUROC and PRO on each, for EfficientNet-Lite0 and DINOv2 ViT-S/14 (224).
set -uo pipefail
S=${SAGE:-sage}; R=docs/results/synth-elpv
for m in cutpaste draem nsa; do
  out=${TREES:-/tmp}/synth-elpv-$m
  [ -d $out ] || $S --json data synth --source elpv --out $out --method $m --per-image 1 --seed 0 --limit 100 > /dev/null
  for e in efficientnet dinov2; do
    f=$R/map-eval-$m-$e.json
    [ -s $f ] && continue
    start=$(date +%s)
    $S --json map --eval --data $out --encoder $e --seed 0 > $f.tmp 2> $R/map-eval-$m-$e.err && mv $f.tmp $f
    echo "$m $e rc=$? $(( $(date +%s)-start ))s" >> $R/map-eval.log
  done
done
echo done >> $R/map-eval.log
