#!/usr/bin/env bash
# The synthetic ELPV trees (synth_map.sh) scored with a memory bank of each cell type's first K
# train/good references: encoder × K × method, one JSON each. Resumable: finished files are kept.
set -uo pipefail
S=${SAGE:-sage}; R=docs/results/synth-elpv/bank
mkdir -p $R
for k in 1 4 16; do
  for m in cutpaste draem nsa; do
    for e in efficientnet dinov2; do
      f=$R/$m-$e-k$k.json
      [ -s $f ] && continue
      $S --json map --eval --data ${TREES:-/tmp}/synth-elpv-$m --encoder $e --shots $k --seed 0 > $f.tmp 2>/dev/null && mv $f.tmp $f
    done
  done
done
echo done > $R/done
