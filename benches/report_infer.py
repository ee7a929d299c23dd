"""Formats a `sage --json bench infer` report as a markdown table (stdout)."""

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--env", default="")
    ap.add_argument("--command", default="")
    a = ap.parse_args()
    r = json.load(open(a.report))
    print(f"# sage bench infer\n\n- machine: {a.env}\n- command: `{a.command}`\n- threads: {r['threads']}\n")
    for m in r["models"]:
        lc = m["llama_cpp"]
        batches = sorted({int(b) for row in m["modes"] for b in row["decode_tokens_per_second"]})
        print(f"## {m['model']} ({m['path'].split('/')[-1]})\n")
        print(f"prefill {m['prompt_tokens']} tokens (median of runs), greedy decode {m['decode_tokens']} steps, "
              f"perplexity over {m['ppl_tokens']} tokens of benches/ppl_text.txt\n")
        head = "| engine | weights MiB | perplexity | prefill tok/s | " + " | ".join(f"decode b{b} tok/s" for b in batches) + " |"
        print(head)
        print("|" + "---|" * (4 + len(batches)))
        for row in m["modes"]:
            dec = " | ".join(f"{row['decode_tokens_per_second'].get(str(b), float('nan')):.1f}" for b in batches)
            print(f"| sage {row['weights']} | {row['weight_mib']:.1f} | {row['ppl']:.4f} | "
                  f"{row['prefill_tokens_per_second']:.1f} | {dec} |")
        if "ppl" in lc:
            dec = " | ".join(f"{lc['decode_tokens_per_second'].get(str(b), float('nan')):.1f}" for b in batches)
            print(f"| llama.cpp {lc.get('llama_cpp_python', '')} | | {lc['ppl']:.4f} | "
                  f"{lc['prefill_tokens_per_second']:.1f} | {dec} |")
        else:
            print(f"\nllama.cpp: {lc.get('unavailable')}")
        print()
        if m.get("max_abs_logit_diff") is not None:
            print(f"- quantized vs f32: max |Δlogit| {m['max_abs_logit_diff']:.4f} (max |logit| "
                  f"{m['max_abs_logit']:.2f}), perplexity {100 * m['ppl_relative_diff']:+.3f} %")
        for k, v in m["ratios"].items():
            print(f"- sage quantized / llama.cpp, {k.replace('_', ' ')}: {v:.3f}")
        if "system_info" in lc:
            print(f"- llama.cpp system info: `{lc['system_info'].strip()}`")
        print()


if __name__ == "__main__":
    main()
