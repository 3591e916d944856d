"""Writes the example files of the chapter "Your data, your model": one per common layout, from the toy.

Run from the repository root: `python book/part3/your-data/make_examples.py`. The files are committed; this
script says where their rows came from (the toy task world's training split) and how they were shaped.
"""

import csv
import json
from pathlib import Path

from ftcourse.toy.tasks import build_tasks

HERE = Path(__file__).parent
tasks = build_tasks("train", 12)  # 12 tasks per family, 48 rows per file

# Alpaca as a JSON array: `input` present where the task has one, absent otherwise (both occur on the hub).
alpaca = [
    {"instruction": t.instruction, **({"input": t.input} if t.input else {}), "output": t.answer}
    for t in tasks
]
(HERE / "alpaca.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

# ShareGPT as JSON lines: ids, human/gpt speakers, a system turn on some rows, and `bot`/`chatgpt` on others.
with (HERE / "sharegpt.jsonl").open("w", encoding="utf-8") as handle:
    for i, t in enumerate(tasks):
        reply_speaker = ("gpt", "gpt", "bot", "chatgpt")[i % 4]
        turns = [{"from": "system", "value": "Answer with the value only."}] if i % 3 == 0 else []
        turns += [{"from": "human", "value": t.prompt}, {"from": reply_speaker, "value": t.answer}]
        handle.write(json.dumps({"id": f"conv-{i:03d}", "conversations": turns}, ensure_ascii=False) + "\n")

# Preference pairs as a CSV saved by Excel: UTF-8 with a byte-order mark, plain-text cells, a `source` column.
with (HERE / "pairs.csv").open("w", encoding="utf-8-sig", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["prompt", "chosen", "rejected", "source"])
    for i, t in enumerate(tasks):
        writer.writerow([t.prompt, t.answer, t.distractors[i % len(t.distractors)], "annotator-a"])

# Thumbs up/down feedback as TSV with the words people write for labels.
with (HERE / "feedback.tsv").open("w", encoding="utf-8", newline="") as handle:
    writer = csv.writer(handle, delimiter="\t")
    writer.writerow(["prompt", "completion", "label"])
    for i, t in enumerate(tasks):
        good = i % 2 == 0
        writer.writerow([t.prompt, t.answer if good else t.distractors[0], "yes" if good else "no"])
