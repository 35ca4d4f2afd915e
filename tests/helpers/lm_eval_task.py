"""A local lm_eval multiple-choice task: six questions, written into a folder with its YAML."""

import json
from pathlib import Path

CHOICE_TASK = "mswa_tiny_choice"
CHOICE_DOCS = [
    ("Where does milk stay cold?", ["in the fridge", "in the oven", "on the roof"], 0),
    ("What does the quick fox jump over?", ["the moon", "the lazy dog"], 1),
    ("How do you open a jar?", ["paint it blue", "twist the lid", "sing to it"], 1),
    ("What happens to ice when it is warm?", ["it melts", "it boils"], 0),
    ("Where did the cat sit?", ["in the sea", "on a cloud", "on the mat"], 2),
    ("When does water boil?", ["when it is heated", "when it is dark"], 0),
]


def write_choice_task(folder: Path) -> Path:
    """A local lm_eval multiple-choice task (CHOICE_TASK): its YAML and its data, written into folder."""
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"question": q, "choices": c, "label": label} for q, c, label in CHOICE_DOCS]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"""task: {CHOICE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {folder / "train.jsonl"}
    test: {folder / "test.jsonl"}
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    return folder
