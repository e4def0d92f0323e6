"""Turn the original AI2 ARC jsonl layout into the Hugging Face `allenai/ai2_arc` one lm-eval's arc tasks expect.

AI2: {"id", "question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey"}
hub: {"id", "question": stem, "choices": {"text": [...], "label": [...]}, "answerKey"}
"""

from __future__ import annotations

import datasets


def to_hub_layout(doc: dict) -> dict:
    choices = doc["question"]["choices"]
    return {
        "id": doc["id"],
        "question": doc["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": doc["answerKey"],
    }


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(to_hub_layout, remove_columns=dataset.column_names)
