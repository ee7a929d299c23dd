#!/usr/bin/env python3
"""ΔH_max and ΔH_min per instance from `sage score` caches (ARCHITECTURE.md §1): H(a) is the
entropy of the softmax of an answer's three scores; ΔH_max = H(a_1) − H(a_4); ΔH_min is the
smallest |H(a_i) − H(a_{i+1})| over adjacent ranks (the pair E-DPO's second pair is). Usage:
delta_h.py SCORES.jsonl [MAX_INSTANCES]."""
import json, math, sys, statistics
from collections import defaultdict

def entropy(s):
    m = max(s)
    e = [math.exp(v - m) for v in s]
    z = sum(e)
    return -sum((v / z) * math.log(v / z) for v in e)

by = defaultdict(dict)
for line in open(sys.argv[1]):
    r = json.loads(line)
    s = r["scores"]
    by[r["instance"]][r["answer"]] = (entropy([s["type"], s["location"], s["logic"]]), (s["type"] + s["location"] + s["logic"]) / 3)
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
insts = [v for v in by.values() if len(v) == 4][:limit]
dmax = [v[0][0] - v[3][0] for v in insts]
dmin = [min(abs(v[i][0] - v[i + 1][0]) for i in range(3)) for v in insts]
which = [min(range(3), key=lambda i: abs(v[i][0] - v[i + 1][0])) for v in insts]
def q(xs):
    xs = sorted(xs)
    pick = lambda p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]
    return f"mean {statistics.mean(xs):.3f}, sd {statistics.pstdev(xs):.3f}, min {xs[0]:.3f}, p10 {pick(.1):.3f}, median {pick(.5):.3f}, p90 {pick(.9):.3f}, max {xs[-1]:.3f}"
print(f"{len(insts)} instances")
print("MLE by rank:", ", ".join(f"{statistics.mean(v[i][1] for v in insts):.2f}" for i in range(4)))
print("ΔH_max:", q(dmax))
print("|ΔH_min|:", q(dmin))
print("ΔH_min pair (ranks):", {f"{i+1}-{i+2}": which.count(i) for i in range(3)})
