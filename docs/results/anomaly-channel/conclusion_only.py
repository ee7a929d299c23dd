"""Writes train-concl.json: data/train.json with each question's best answer cut to its
conclusion ("Yes." / "No."), so SFE's cross-entropy falls on the conclusion token alone."""
import json
import re

d = json.load(open("data/train.json"))
for item in d:
    for q in item["question_answer"]:
        best = q["answer_options"][0]["answer_en"]
        m = re.match(r"\s*(Yes|No)\b", best)
        assert m, best
        q["answer_options"][0]["answer_en"] = m.group(1) + "."
json.dump(d, open("data/train-concl.json", "w"), indent=1)
