#!/usr/bin/env bash
# Two sage binaries' `sage bench train --device cpu` side by side in one call on one machine (the
# one-engine check: the new binary may not be more than 5% worse on any figure). Each binary runs
# the same arguments ROUNDS times, alternating (old, new, old, new, ...), so a change of machine
# load hits both; the report gives each figure's best round and the median of the per-round
# new/old ratios. Raw JSON of every round is kept.
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
from statistics import median
d, rounds = sys.argv[1], int(sys.argv[2])
def load(side):
    return [json.load(open(f"{d}/{side}-{r}.json")) for r in range(1, rounds + 1)]
old, new = load("old"), load("new")
rows = []
for i, m in enumerate(old[0]["results"]):
    name = m["model"]
    def vals(runs, key):
        return [run["results"][i][key] for run in runs]
    def gen(runs, b):
        return [next(g["tokens_per_second"] for g in run["results"][i]["generation"] if g["batch"] == b) for run in runs]
    rows.append((name, "training tokens/s", vals(old, "train_tokens_per_second"), vals(new, "train_tokens_per_second"), True))
    for b in sorted({g["batch"] for g in m["generation"]}):
        rows.append((name, f"generation tokens/s, batch {b}", gen(old, b), gen(new, b), True))
    mib = lambda v: [x / 2**20 for x in v]
    rows.append((name, "peak RSS (MiB)", mib(vals(old, "peak_rss_bytes")), mib(vals(new, "peak_rss_bytes")), False))
    rows.append((name, "first-step loss", vals(old, "loss_first"), vals(new, "loss_first"), None))
print(f"# `sage bench train --device cpu`: old vs new binary, {rounds} alternating round(s)\n")
print("Best: each binary's best round. Paired: the median over rounds of new / old within a round")
print("(the two runs of a round are back to back, so a change of machine load hits both).\n")
print("| model | figure | old (best) | new (best) | best new / old | paired new / old | worse by (best / paired) |")
print("|---|---|---|---|---|---|---|")
worst_best = worst_paired = 0.0
for name, what, o, n, higher in rows:
    if higher is None:
        bo, bn = o[0], n[0]
    elif higher:
        bo, bn = max(o), max(n)
    else:
        bo, bn = min(o), min(n)
    ratio = bn / bo if bo else float("nan")
    paired = median([y / x for x, y in zip(o, n) if x])
    if higher is None:
        bad = ""
    else:
        wb = (1 - ratio) if higher else (ratio - 1)
        wp = (1 - paired) if higher else (paired - 1)
        worst_best, worst_paired = max(worst_best, wb), max(worst_paired, wp)
        fmt = lambda w: f"{100 * w:.1f}%" if w > 0 else "—"
        bad = f"{fmt(wb)} / {fmt(wp)}"
    print(f"| {name} | {what} | {bo:.4g} | {bn:.4g} | {ratio:.3f} | {paired:.3f} | {bad} |")
print("\nTraining tokens/s by round (old, new):")
for name, what, o, n, higher in rows:
    if what == "training tokens/s":
        print(f"- {name}: " + ", ".join(f"({x:.2f}, {y:.2f})" for x, y in zip(o, n)))
def verdict(w):
    return f"{100 * w:.1f}% ({'within' if w <= 0.05 else 'OVER'} the 5% bound)"
print(f"\nLargest regression: best rounds {verdict(worst_best)}; paired rounds {verdict(worst_paired)}.")
PY
echo "raw outputs and report: $dir" >&2
