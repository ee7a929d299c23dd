#!/usr/bin/env python3
"""Merges `sage --json bench kernels` and `benches/kernels_torch.py` output (measured in the same
call on the same device) into one report: JSON plus markdown, with the ratios against the targets
of ARCHITECTURE.md §9.

    python3 benches/report.py SAGE.json TORCH.json --out benches/results/kernels-STAMP [--env ENV.txt]
"""

import argparse
import json

# (op, sage variant, torch variant, kind, target, what the target says)
#   kind "speedup": torch_ms / sage_ms ≥ target;  "throughput": sage_tflops / torch_tflops ≥ target;
#   "memory": sage_bytes / torch_peak_bytes ≤ target.
TARGETS = [
    ("mincos_topk", "v2", "eager", "speedup", 3.0, "≥ 3× PyTorch eager"),
    ("mincos_topk", "v2", "compile", "speedup", 1.5, "≥ 1.5× torch.compile"),
    ("fusion_attn_fwd_bwd", "v1", "eager", "speedup", 2.0, "≥ 2× PyTorch eager"),
    ("fusion_attn_fwd_bwd", "v1", "sdpa", "speedup", None, "(information: SDPA)"),
    ("fusion_attn_fwd_bwd", "v1", "compile", "speedup", None, "(information: torch.compile)"),
    ("gemm_bf16", "cublaslt", "torch.matmul", "throughput", 0.95, "≥ 95% of torch.matmul"),
    ("edpo_loss_fwd_bwd", "fused", "unfused", "speedup", 1.5, "≥ 1.5× the unfused reference"),
    ("edpo_loss_fwd_bwd", "fused", "unfused", "memory", 0.25, "peak memory ≤ ¼ of the unfused reference"),
    ("edpo_loss_fwd_bwd", "fused", "unfused+compile", "speedup", None, "(information: unfused + torch.compile)"),
    ("decode_attn", "v1", "sdpa", "speedup", None, "(information: SDPA over the cache)"),
    ("decode_attn", "v2", "sdpa", "speedup", None, "(information: SDPA over the cache)"),
    ("dwconv_fwd_bwd", "v1", "eager", "speedup", None, "(information: cuDNN depthwise conv)"),
    ("dwconv_fwd_bwd", "v1", "compile", "speedup", None, "(information: torch.compile)"),
]


# Shape keys that describe sage's launch (split counts, chunk sizes), not the problem.
LAUNCH_KEYS = {"nsplit", "chunk"}


def same_shape(a, b):
    """The same problem: every size both sides name (launch details aside) agrees."""
    return all(a[k] == b[k] for k in set(a) & set(b) - LAUNCH_KEYS)


def compare(sage, torch):
    rows = []
    for op, sv, tv, kind, target, says in TARGETS:
        for s in [c for c in sage["cases"] if c["op"] == op and c["variant"] == sv]:
            for t in [c for c in torch["cases"] if c["op"] == op and c["variant"] == tv and same_shape(s["shape"], c["shape"])]:
                if kind == "speedup":
                    ratio = t["median_ms"] / s["median_ms"]
                    ok = None if target is None else ratio >= target
                elif kind == "throughput":
                    ratio = s["tflops"] / t["tflops"]
                    ok = ratio >= target
                else:
                    if not t.get("peak_extra_bytes"):
                        continue
                    ratio = s["allocated_bytes"] / t["peak_extra_bytes"]
                    ok = ratio <= target
                rows.append(dict(op=op, shape=s["shape"], sage=sv, torch=tv, kind=kind, sage_ms=s["median_ms"],
                                 torch_ms=t["median_ms"], sage_bytes=s["allocated_bytes"],
                                 torch_peak_bytes=t.get("peak_extra_bytes"), ratio=ratio, target=target,
                                 target_text=says, met=ok))
    return rows


def mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def markdown(sage, torch, rows, env):
    dev = sage["device"]
    out = [f"# Kernel benchmark: {dev['name']}", ""]
    out.append(f"- sage: compute capability {dev['compute_capability'][0]}.{dev['compute_capability'][1]}, "
               f"{dev['sm_count']} SMs, CUDA driver API {dev['driver_version']}; median of {sage['repeats']} "
               f"after {sage['warmup']} warm-up runs (CUDA events)")
    ti = torch["info"]
    out.append(f"- PyTorch {ti.get('torch')} (CUDA {ti.get('cuda')}) on {ti.get('name', ti.get('device'))}; "
               f"median of {torch['repeats']} after {torch['warmup']} warm-up runs")
    if env:
        out.append(f"- environment: {env.strip()}")
    out += ["", "## Against the targets (ARCHITECTURE.md §9)", "",
            "| op | shape | sage | PyTorch | sage ms | PyTorch ms | sage MiB | PyTorch peak MiB | ratio | target | met |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = f"{r['ratio']:.2f}" + ("×" if r["kind"] == "speedup" else "")
        out.append(f"| {r['op']} | {shape} | {r['sage']} | {r['torch']} | {r['sage_ms']:.3f} | {r['torch_ms']:.3f} | "
                   f"{mib(r['sage_bytes'])} | {mib(r['torch_peak_bytes'])} | {ratio} | {r['target_text']} | {met} |")
    out += ["", "## Every measurement", "", "| side | op | variant | shape | median ms | TFLOP/s | MiB |", "|---|---|---|---|---|---|---|"]
    for side, d, key in (("sage", sage, "allocated_bytes"), ("PyTorch", torch, "peak_extra_bytes")):
        for c in d["cases"]:
            tf = "-" if c.get("tflops") is None else f"{c['tflops']:.1f}"
            shape = ", ".join(f"{k} {v}" for k, v in c["shape"].items())
            out.append(f"| {side} | {c['op']} | {c['variant']} | {shape} | {c['median_ms']:.3f} | {tf} | {mib(c.get(key))} |")
    out += ["", "sage MiB: bytes the op allocates (intermediates and outputs; an upper bound of its peak). "
            "PyTorch MiB: torch.cuda.max_memory_allocated above the inputs.", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sage")
    ap.add_argument("torch")
    ap.add_argument("--out", required=True, help="path stem: writes STEM.json and STEM.md")
    ap.add_argument("--env", help="a file with nvidia-smi's one-line summary")
    a = ap.parse_args()
    sage = json.load(open(a.sage))
    torch = json.load(open(a.torch))
    env = open(a.env).read() if a.env else ""
    rows = compare(sage, torch)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(sage=sage, torch=torch, environment=env.strip(), comparisons=rows), f, indent=1)
    md = markdown(sage, torch, rows, env)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
