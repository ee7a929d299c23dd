#!/usr/bin/env python3
"""The preference sweep's table: one row per evaluated model (eval/<name>.json written by
`sage eval --first-token`), with the 95% intervals the reports carry and the share of Yes."""
import json, pathlib, sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
order = ["sfe", "dpo-paper", "dpo-paper-lowlr", "dpo-sft", "dpo-norm", "dpo-fixed", "edpo-fixed"]
names = sorted((p.stem for p in (root / "eval").glob("*.json")), key=lambda n: (order + [n]).index(n))
def ci(a, m, scale, d):
    v = a["intervals"]["metrics"].get(m)
    if v is None:
        return "—"
    return f"{v['estimate']*scale:.{d}f} [{v['lo']*scale:.{d}f}, {v['hi']*scale:.{d}f}]"
print("| Model | Accuracy (%) | Acc-G (%) | Model AUROC | Says Yes (%) | Truth Yes (%) | Yes/No mass |")
print("|---|---|---|---|---|---|---|")
for n in names:
    a = json.loads((root / "eval" / f"{n}.json").read_text())["adpl"]
    print(f"| {n} | {ci(a, 'average', 100, 1)} | {ci(a, 'acc_g', 100, 1)} | {ci(a, 'model_auroc', 1, 3)} | "
          f"{100*a['yes_share']:.1f} | {100*a['truth_yes_share']:.1f} | {a['first_token_mass']:.3f} |")
