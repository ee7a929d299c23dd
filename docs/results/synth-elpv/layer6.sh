#!/usr/bin/env bash
# DINOv2 block 6 (chosen on a 30-per-label DRAEM probe: docs/results/synth-elpv/layer-probe): the ELPV few-shot
# table and the synthetic ELPV map evaluation again.
set -uo pipefail
S=${SAGE:-sage}; R=docs/results
start=$(date +%s)
[ -s $R/map-shots/elpv-shots-224-max-block6.json ] || { $S --json map --eval-elpv --shots 1,4,16,full --encoder efficientnet,dinov2 --size 224 --layer 6 > /tmp/l6.json 2>/tmp/l6.err && mv /tmp/l6.json $R/map-shots/elpv-shots-224-max-block6.json; echo "shots rc=$? $(( $(date +%s)-start ))s" >> $R/map-shots/block6.log; }
for m in cutpaste draem nsa; do
  f=$R/synth-elpv/map-eval-$m-dinov2-block6.json
  [ -s $f ] && continue
  start=$(date +%s)
  $S --json map --eval --data ${TREES:-/tmp}/synth-elpv-$m --encoder dinov2 --layer 6 --seed 0 > $f.tmp 2> /tmp/l6-$m.err && mv $f.tmp $f
  echo "$m dinov2 block6 rc=$? $(( $(date +%s)-start ))s" >> $R/synth-elpv/map-eval.log
done
echo done >> $R/map-shots/block6.log
