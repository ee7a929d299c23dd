#!/usr/bin/env bash
# Preference-stage experiment: does DPO/E-DPO collapse to "Yes", and which loss options stop it?
# One SFE start (facts none), then preference variants from it; every model scored on the same
# 150 ELPV test pairs with first-token conclusions. Resumable: each finished piece is skipped.
set -euo pipefail
SAGE=${SAGE:-target/release/sage}
D=$(realpath -m "${DATA:-data/elpv}")   # from `sage data build --source elpv --out data/elpv --seed 0`
W=$(realpath -m "${OUT:-runs/pref-sweep}"); SAGE=$(realpath "$SAGE"); mkdir -p "$W"
cd "$W"
ITEMS=400
EVAL_ITEMS=150
[ -f $D/train.scores.jsonl ] && [ "$(wc -l < $D/train.scores.jsonl)" -ge $((ITEMS*20)) ] || \
  $SAGE score --data $D/train.json --judge rubric --max-items $ITEMS > score.log 2>&1
cat > sfe.toml <<T
[data]
train = "$D/train.json"
val = "$D/test.json"
max_train_items = $ITEMS
zero_shot = false
[model]
facts = "none"
k = 8
reduce = "nearest"
fusion_dim = 128
fusion_heads = 4
image_pool = 4
[llm]
finetune = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_targets = ["attn_q", "attn_v"]
[train]
steps = 60
batch = 4
lr = 0.002
warmup_steps = 6
min_lr_ratio = 0.1
weight_decay = 0.0
max_grad_norm = 1.0
seed = 0
val_every = 0
val_questions = 5
checkpoint_every = 20
T
if [ ! -f sfe/final.json ]; then
  R=""; [ -f sfe/state.json ] && R="--resume"
  $SAGE sfe --config sfe.toml --out sfe $R > sfe.log 2>&1
fi
ev() { # name checkpoint
  [ -f eval/$1.json ] || $SAGE eval --checkpoint $2 --data $D/test.json --first-token --generate-items 4 \
     --max-tokens 40 --max-items $EVAL_ITEMS --save-answers eval/$1.answers.jsonl --out eval/$1.md > eval/$1.log 2>&1
}
mkdir -p eval
ev sfe sfe
variant() { # name loss lr extra-edpo-lines
  cat > $1.toml <<T
sfe = "$W/sfe"
[data]
train = "$D/train.json"
scores = "$D/train.scores.jsonl"
max_train_items = $ITEMS
[edpo]
loss = "$2"
$(if [[ "$4" == beta_override* ]]; then echo "beta = 2.5"; else echo "beta = 0.1"; fi)
eta = 1.0
pairs = "both"
${4#beta_override}
[train]
steps = 30
batch = 2
lr = $3
warmup_steps = 3
min_lr_ratio = 0.1
weight_decay = 0.0
max_grad_norm = 1.0
seed = 0
val_every = 0
val_questions = 5
checkpoint_every = 10
T
  if [ ! -f $1/final.json ]; then
    R=""; [ -f $1/state.json ] && R="--resume"
    $SAGE edpo --config $1.toml --out $1 $R > $1.log 2>&1
  fi
  ev $1 $1
}
variant dpo-paper dpo 5e-4 ""
variant dpo-paper-lowlr dpo 1e-4 ""
FIX=$'beta_override\nlength_normalize = true\nsft_weight = 1.0\nbalance_conclusions = true'
variant dpo-fixed dpo 1e-4 "$FIX"
variant edpo-fixed edpo 1e-4 "$FIX"
variant dpo-norm dpo 1e-4 $'beta_override\nlength_normalize = true\nbalance_conclusions = true'
variant dpo-sft dpo 1e-4 $'sft_weight = 1.0'
echo done
