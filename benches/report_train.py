#!/usr/bin/env python3
"""Merges `sage --json bench train` and `benches/train_hf.py` output (same call, same machine) into
one report, JSON plus markdown: training tokens/s, generation tokens/s and peak memory, with the
ratio sage / HF transformers for each attention implementation. The target of ARCHITECTURE.md §9
(≥ 1.3× HF tokens/s) is for the GPU; a CPU report says so.

    python3 benches/report_train.py SAGE.json HF.json --out benches/results/train-STAMP [--env ENV.txt]
"""

import argparse
import json


def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sage")
    ap.add_argument("hf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--env")
    a = ap.parse_args()
    sage, hf = json.load(open(a.sage)), json.load(open(a.hf))
    env = open(a.env).read().strip() if a.env else ""
    rows = []
    for s in sage["results"]:
        for h in [h for h in hf["results"] if h["model"] == s["model"]]:
            gen = []
            for g in s["generation"]:
                hg = next((x for x in h["generation"] if x["batch"] == g["batch"]), None)
                if hg:
                    gen.append(dict(batch=g["batch"], sage=g["tokens_per_second"], hf=hg["tokens_per_second"],
                                    ratio=g["tokens_per_second"] / hg["tokens_per_second"],
                                    sage_peak_bytes=g.get("peak_device_bytes"), hf_peak_bytes=hg.get("peak_bytes")))
            rows.append(dict(model=s["model"], attn=h["attn"], batch=s["batch"], seq=s["seq"],
                             sage_tokens_per_second=s["train_tokens_per_second"],
                             hf_tokens_per_second=h["train_tokens_per_second"],
                             train_ratio=s["train_tokens_per_second"] / h["train_tokens_per_second"],
                             sage_peak_bytes=s.get("peak_device_bytes", s.get("peak_rss_bytes")),
                             hf_peak_bytes=h.get("peak_bytes"),
                             generation=gen))
    on_gpu = hf["info"]["device"].startswith("cuda")
    md = [f"# Training step and generation: sage vs HF transformers ({'GPU' if on_gpu else 'CPU'})", ""]
    md.append(f"- sage: {sage['engine']}, {sage['threads']} threads, median of {sage['steps']} steps after one warm-up")
    i = hf["info"]
    md.append(f"- HF: transformers {i['transformers']}, PyTorch {i['torch']}, {i['device']} {i['dtype']}, "
              f"{i['threads']} threads, median of {hf['steps']} steps after one warm-up")
    if env:
        md.append(f"- machine: {env}")
    sage_gpu = "GPU" in sage["engine"]
    if on_gpu != sage_gpu:
        md.append(f"- **not comparable**: sage ran on the {'GPU' if sage_gpu else 'CPU'}, HF on the {'GPU' if on_gpu else 'CPU'}.")
    if not on_gpu:
        md.append("- CPU measurement: ARCHITECTURE.md §9's target (≥ 1.3× HF tokens/s) is for the GPU path.")
    else:
        met = [r for r in rows if r["train_ratio"] >= 1.3]
        md.append(f"- ARCHITECTURE.md §9 target, training tokens/s ≥ 1.3× HF: met in {len(met)} of {len(rows)} comparisons.")
        md.append("- Peak memory: device memory (sage: the allocator pool's high-water mark, fp32 master weights and "
                  "moments included; HF: torch.cuda.max_memory_allocated, bf16 parameters and optimizer state).")
    if not any(s["generation"] for s in sage["results"]):
        md.append("- sage's generation was not measured in this run (--gen-tokens 0); HF generate figures are in the "
                  "raw JSON.")
    md += ["", "Random weights at the model's shapes, full fine-tune, AdamW (lr 1e-5), the same token ids on both sides.", "",
           "| model | HF attention | batch × seq | sage tokens/s | HF tokens/s | sage / HF | sage peak GiB | HF peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['attn']} | {r['batch']} × {r['seq']} | {r['sage_tokens_per_second']:.1f} | "
                  f"{r['hf_tokens_per_second']:.1f} | {r['train_ratio']:.2f} | {gib(r['sage_peak_bytes'])} | {gib(r['hf_peak_bytes'])} |")
    md += ["", "Generation (greedy, new tokens of all sequences per second, prefill included):", "",
           "| model | HF attention | batch | sage tokens/s | HF tokens/s | sage / HF | sage peak GiB | HF peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for g in r["generation"]:
            md.append(f"| {r['model']} | {r['attn']} | {g['batch']} | {g['sage']:.1f} | {g['hf']:.1f} | {g['ratio']:.2f} | "
                      f"{gib(g.get('sage_peak_bytes'))} | {gib(g.get('hf_peak_bytes'))} |")
    md.append("")
    text = "\n".join(md)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(sage=sage, hf=hf, environment=env, comparisons=rows), f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
