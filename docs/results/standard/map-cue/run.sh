#!/usr/bin/env bash
# Issue 17: the standard profile's fused-facts SFE run with `model.map_cue = true`, DPO and E-DPO
# from it (STANDARD_PREF), and the baseline (no facts) with the cue; each evaluated as the demo
# evaluates (all 466 test pairs, first-token conclusions, 20 generated pairs), then compared with
# its start and with the same row without the cue (../rerun-20261204). Data, facts and judge
# scores: `sage demo --profile standard --out $D` stopped once it reached its first SFE run.
# Rerunning resumes: finished runs and reports are skipped.
set -uo pipefail
S=${SAGE:-sage}; D=${DEMO:-/work/exp/std-cue}; R=$(cd "$(dirname "$0")" && pwd); B=$R/../rerun-20261204/eval
mkdir -p $D/runs $D/eval $D/logs
ev() {
  [ -f $D/eval/$1.json ] || $S eval --checkpoint $D/runs/$1 --data $D/data/test.json --facts $D/data/facts.jsonl --max-tokens 48 --judge-config '{"graded":true}' --save-answers $D/eval/$1.answers.jsonl --first-token --save-first-token $D/eval/$1.first-token.jsonl --generate-items 20 --out $D/eval/$1.md > $D/logs/eval-$1.txt 2>&1
}
for v in ${ROWS:-sfe-fused-cue edpo-fused-dpo-cue edpo-fused-edpo-cue sfe-none-cue}; do
  stage=${v%%-*}
  [ -f $D/runs/$v/final.json ] || $S $stage --config $R/configs/$v.toml --out $D/runs/$v $( [ -d $D/runs/$v ] && echo --resume ) > $D/logs/$v.txt 2>&1
  ev $v
done
c() { [ -f $D/eval/$1.json ] && [ -f $2 ] && $S compare $D/eval/$1.json $2 > $R/compare-$1-vs-$3.md 2>&1; }
c edpo-fused-dpo-cue $D/eval/sfe-fused-cue.json sfe-fused-cue
c edpo-fused-edpo-cue $D/eval/sfe-fused-cue.json sfe-fused-cue
c edpo-fused-edpo-cue $D/eval/edpo-fused-dpo-cue.json edpo-fused-dpo-cue
c sfe-fused-cue $B/sfe-fused.json sfe-fused
c edpo-fused-edpo-cue $B/edpo-fused-edpo.json edpo-fused-edpo
c sfe-none-cue $B/sfe-none.json sfe-none
c sfe-fused-cue $D/eval/sfe-none-cue.json sfe-none-cue
echo done > $D/done
