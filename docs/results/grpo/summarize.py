#!/usr/bin/env python3
"""Summarises a `sage grpo` run folder as Markdown: the held-out verdict accuracy at the start,
when GRPO began and at the end (95% Wilson intervals; the exact McNemar test of before vs after on
the same images), the held-out figures at every validation of the run (with `train.val_every`),
and the per-step log (loss, reward and its parts, uniform groups, KL, clip fraction), with the
mean of the first and the last half of the sampled batches and Spearman's rank correlation of
each figure with the batch's index (a two-sided permutation p-value, seeded).

    python3 docs/results/grpo/summarize.py RUN_DIR > RUN_DIR.md
"""
import json
import math
import random
import sys
from pathlib import Path


def mcnemar_exact(a, b):
    """Two-sided exact (binomial) McNemar p-value of paired right/wrong lists a (before), b (after)."""
    n01 = sum(1 for x, y in zip(a, b) if not x and y)  # wrong before, right after
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = n01 + n10
    if n == 0:
        return n01, n10, 1.0
    k = min(n01, n10)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return n01, n10, min(1.0, 2 * p)


def ranks(xs):
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(xs, ys):
    """Spearman's rho: Pearson's correlation of the ranks (0 when either side is constant)."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def trend(ys, shuffles=20000, seed=0):
    """Spearman's rho of ys against their index and its two-sided permutation p-value."""
    xs = list(range(len(ys)))
    rho = spearman(xs, ys)
    rng = random.Random(seed)
    perm = list(ys)
    hits = 0
    for _ in range(shuffles):
        rng.shuffle(perm)
        hits += abs(spearman(xs, perm)) >= abs(rho) - 1e-12
    return rho, (hits + 1) / (shuffles + 1)


def paired_bootstrap(a, b, resamples=10000, seed=0):
    """Mean of b − a over paired items and its 95% percentile bootstrap interval (items resampled)."""
    d = [y - x for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(resamples))
    return sum(d) / len(d), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def fmt_val(v):
    lo, hi = v["interval"]
    return (f"{v['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {v['questions']} images "
            f"(majority {v['majority_rate']:.3f}, {v['unparsed']} without a verdict, "
            f"mean reward {v.get('mean_reward', float('nan')):.3f})")


def main(run):
    run = Path(run)
    lines = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    # A run stopped before its end has no final.json: its figures end at its last validation.
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").exists() else None
    out = [f"# `sage grpo` run {run.name}", ""]
    start = next((l["val_start"] for l in lines if "val_start" in l), None)
    before = next(l["val_before"] for l in lines if "val_before" in l)
    after = final["val"] if final else None
    out.append("## Held-out verdicts (greedy answers to the GRPO prompt)")
    out.append("")
    if start:
        out.append(f"- start (the SFE model): {fmt_val(start)}")
    out.append(f"- GRPO begins{' (after the cold start)' if start else ''}: {fmt_val(before)}")
    if after is None:
        out.append("- end: none (the run was stopped before its last step; no final.json)")
    else:
        out.append(f"- end: {fmt_val(after)}")
        n01, n10, p = mcnemar_exact(before["right"], after["right"])
        out.append(f"- before → after on the same images: {n01} wrong→right, {n10} right→wrong, "
                   f"exact McNemar p = {p:.3f}")
    if after and before.get("loc_each") and len(before["loc_each"]) == len(after.get("loc_each", [])):
        d, lo, hi = paired_bootstrap(before["loc_each"], after["loc_each"])
        out.append(f"- localisation reward, before → after on the same {len(before['loc_each'])} images with "
                   f"true boxes: {before['mean_loc']:.3f} → {after['mean_loc']:.3f}, difference {d:+.3f} "
                   f"[{lo:+.3f}, {hi:+.3f}] (95% paired bootstrap)")
    if after and after.get("map_right") and len(after["map_right"]) == len(after["right"]):
        n01, n10, p = mcnemar_exact(after["map_right"], after["right"])
        out.append(f"- the map's own verdict (its score at the cue's middle level or above) on the same images: "
                   f"accuracy {after['map_accuracy']:.3f}; the model at the end against it: {n01} pairs only the "
                   f"model gets right, {n10} only the map, exact McNemar p = {p:.3f}")
    vals = [("0 (SFE)", start)] if start else []
    vals += [(str(l["step"]), l) for l in lines if "val_accuracy" in l]
    if len(vals) > (1 if start else 0):
        if after:
            vals.append((f"{final['steps']} (end)", after))
        out.append("")
        out.append("Every validation on the same held-out images (greedy answers; localisation over the "
                   "images with true boxes; the map's region as the one box, for reference):")
        out.append("")
        # The map's verdict column only where the run's build logged it.
        map_verdict = any(v.get("map_accuracy", v.get("val_map_accuracy")) is not None for _, v in vals)
        head = "| after step | accuracy | mean reward | localisation | the map's region |"
        out.append(head + (" the map's verdict |" if map_verdict else ""))
        out.append("|---|---|---|---|---|" + ("---|" if map_verdict else ""))
        for step, v in vals:
            acc = v.get("accuracy", v.get("val_accuracy"))
            cells = [v.get("mean_reward", v.get("val_mean_reward")), v.get("mean_loc", v.get("val_mean_loc")),
                     v.get("map_loc", v.get("val_map_loc"))]
            if map_verdict:
                cells.append(v.get("map_accuracy", v.get("val_map_accuracy")))
            out.append(f"| {step} | {acc:.3f} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    out.append("")
    out.append("## Steps")
    out.append("")
    cols = ["step", "phase", "loss", "lr", "reward", "reward_format", "reward_class", "reward_loc",
            "overlong_penalty", "cut_off", "uniform_groups", "resampled_groups", "kl", "clip_fraction",
            "answer_tokens", "target_over_cap", "seconds"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for l in lines:
        if "loss" not in l:
            continue
        cells = []
        for c in cols:
            v = l.get(c)
            fmt = ".2e" if c == "lr" else ".3f"
            cells.append("" if v is None else (format(v, fmt) if isinstance(v, float) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    grpo = [l for l in lines if l.get("phase") == "grpo" and l.get("update") == 1]
    if grpo:
        h = len(grpo) // 2 or 1
        out.append("")
        out.append(f"Sampled batches: {len(grpo)} (each trained on twice or more; the rollout figures are per batch).")
        for k in ["reward", "reward_format", "reward_class", "reward_loc", "overlong_penalty", "cut_off",
                  "answer_tokens", "uniform_groups"]:
            vals = [l[k] for l in grpo if l.get(k) is not None]
            if len(vals) >= 2:
                a, b = vals[:h], vals[h:]
                rho, p = trend(vals)
                out.append(f"- {k}: first half {sum(a)/len(a):.3f}, second half {sum(b)/len(b):.3f} "
                           f"(batches {len(a)} + {len(b)}); Spearman rho with the batch index {rho:+.2f}, "
                           f"permutation p {'< 0.001' if p < 0.001 else f'= {p:.3f}'}")
        out.append("")
        out.append("Sample answers (the first answer of each sampled batch):")
        out.append("")
        for l in grpo:
            out.append(f"- step {l['step']}: `{l.get('sample_answer', '')[:200]}`")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
