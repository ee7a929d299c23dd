set -e
S=/work/main/target/release/sage
cd "${WORK:-/work/exp/ac}"
for ch in $VARIANTS; do
  [ -f runs/sfe-$ch/final.json ] || $S sfe --config sfe-$ch.toml --out runs/sfe-$ch $( [ -d runs/sfe-$ch ] && echo --resume ) > sfe-$ch.log 2>&1
  [ -f eval-$ch.json ] || $S eval --checkpoint runs/sfe-$ch --data data/test.json --first-token --max-items 100 --balanced --generate-items 0 --max-tokens 16 --save-first-token eval-$ch.first-token.jsonl --out eval-$ch.md > eval-$ch.log 2>&1
done
echo done
