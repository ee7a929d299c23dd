#!/usr/bin/env bash
# Issue 17 follow-up: the preference stages from the standard profile's SFE start (runs/sfe-fused)
# with the paper's loss plus an SFT term on the chosen answer (sft_weight 1, beta 0.1, summed
# log-ratios, unbalanced pairs: pref-sweep's dpo-sft), DPO and E-DPO, evaluated as the demo does.
set -uo pipefail
S=${SAGE:-sage}; D=${DEMO:-/work/exp/demo-standard}; O=${OUT:-/work/exp/pref-std}
for v in dpo-sft edpo-sft; do
  [ -f $O/runs/$v/final.json ] || $S edpo --config $O/configs/$v.toml --out $O/runs/$v > $O/logs-$v.txt 2>&1
  [ -f $O/eval/$v.json ] || $S eval --checkpoint $O/runs/$v --data $D/data/test.json --facts $D/data/facts.jsonl --max-tokens 48 --judge-config '{"graded":true}' --save-answers $O/eval/$v.answers.jsonl --first-token --save-first-token $O/eval/$v.first-token.jsonl --generate-items 20 --out $O/eval/$v.md > $O/logs-eval-$v.txt 2>&1
  $S compare $O/eval/$v.json $D/eval/sfe-fused.json > $O/compare-$v-vs-sfe-fused.md 2>&1
done
echo done > $O/done
