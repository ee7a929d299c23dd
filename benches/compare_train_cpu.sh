#!/usr/bin/env bash
# Two sage binaries' `sage bench train --device cpu` side by side in one call on one machine (the
# one-engine check: the new binary may not be more than 5% worse on any figure). Each binary runs
# the same arguments ROUNDS times, alternating (old, new, old, new, ...), so a change of machine
# load hits both; the report takes each figure's best round. Raw JSON of every round is kept.
#
#   bash benches/compare_train_cpu.sh OLD_BINARY NEW_BINARY [sage bench train arguments...]
#
# ROUNDS (default 1) sets the rounds; OUT the folder (default benches/results).
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2
shift 2
out=${OUT:-benches/results}
rounds=${ROUNDS:-1}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
dir="$out/train-cpu-old-vs-new-$stamp"
mkdir -p "$dir"
{
  echo "date: $stamp"
  echo "machine: $(nproc) CPU cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "old: $old ($(sha256sum "$old" | cut -c1-12))"
  echo "new: $new ($(sha256sum "$new" | cut -c1-12))"
  echo "arguments: bench train --device cpu --json $*"
} > "$dir/env.txt"
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    bin=$old
    [ "$side" = new ] && bin=$new
    echo "round $r: $side" >&2
    "$bin" --device cpu --threads "$(nproc)" --json bench train "$@" > "$dir/$side-$r.json"
  done
done
python3 - "$dir" "$rounds" <<'PY' | tee "$dir/report.md"
import json, sys
d, rounds = sys.argv[1], int(sys.argv[2])
def load(side):
    return [json.load(open(f"{d}/{side}-{r}.json")) for r in range(1, rounds + 1)]
old, new = load("old"), load("new")
rows = []
for i, m in enumerate(old[0]["results"]):
    name = m["model"]
    def best(runs, key, higher=True):
        vals = [run["results"][i][key] for run in runs]
        return max(vals) if higher else min(vals)
    def gen(runs, b):
        return max(next(g["tokens_per_second"] for g in run["results"][i]["generation"] if g["batch"] == b) for run in runs)
    rows.append((name, "training tokens/s", best(old, "train_tokens_per_second"), best(new, "train_tokens_per_second"), True))
    for b in sorted({g["batch"] for g in m["generation"]}):
        rows.append((name, f"generation tokens/s, batch {b}", gen(old, b), gen(new, b), True))
    rows.append((name, "peak RSS (MiB)", best(old, "peak_rss_bytes", False) / 2**20, best(new, "peak_rss_bytes", False) / 2**20, False))
    rows.append((name, "first-step loss", old[0]["results"][i]["loss_first"], new[0]["results"][i]["loss_first"], None))
print(f"# `sage bench train --device cpu`: old vs new binary, best of {rounds} alternating round(s)\n")
print("| model | figure | old | new | new / old | worse by |")
print("|---|---|---|---|---|---|")
worst = 0.0
for name, what, o, n, higher in rows:
    ratio = n / o if o else float("nan")
    if higher is None:
        bad = ""
    else:
        w = (1 - ratio) if higher else (ratio - 1)
        worst = max(worst, w)
        bad = f"{100 * w:.1f}%" if w > 0 else "—"
    print(f"| {name} | {what} | {o:.4g} | {n:.4g} | {ratio:.3f} | {bad} |")
print(f"\nLargest regression: {100 * worst:.1f}% ({'within' if worst <= 0.05 else 'OVER'} the 5% bound).")
PY
echo "raw outputs and report: $dir" >&2
