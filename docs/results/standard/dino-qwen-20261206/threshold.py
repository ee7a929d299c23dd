"""Diagnosis only: each row's question accuracy at p(Yes) >= 0.5 and at the best single threshold
read off the test set itself (an oracle, not a result). Usage, in this folder:
    python3 threshold.py PATH/TO/data/test.json
(the test split `sage data build --source elpv --seed 0` writes)."""
import json
import sys

data = json.load(open(sys.argv[1]))


def truth(q):
    return q["answer_options"][0]["answer_en"].strip().lower().startswith("yes")


for row in ["sfe-none", "sfe-hard", "sfe-fused"]:
    p_yes, yes = [], []
    for line in open(f"eval/{row}.first-token.jsonl"):
        r = json.loads(line)
        p_yes.append(r["probs"][0] / (r["probs"][0] + r["probs"][1]))
        yes.append(truth(data[r["item"]]["question_answer"][r["question"]]))
    n = len(p_yes)

    def acc(t):
        return sum((p >= t) == y for p, y in zip(p_yes, yes)) / n

    best = max((acc(t / 100), t / 100) for t in range(1, 100))
    print(f"{row}: {n} questions, truth Yes {sum(yes) / n:.3f}, accuracy at 0.5 {acc(0.5):.3f}, "
          f"best {best[0]:.3f} at {best[1]:.2f}, mean p(Yes) {sum(p_yes) / n:.3f}")
