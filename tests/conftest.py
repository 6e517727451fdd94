import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Tiny models on a shared 2-core machine run fastest (and most predictably) on one thread.
torch.set_num_threads(1)

PROMPTS = [
    {"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 6) for b in range(1, 4)
]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(student_dir, teacher_dir, prompts.jsonl) with random tiny Qwen2 models sharing a byte tokenizer."""
    from opd.tiny import save_tiny_pair

    root = tmp_path_factory.mktemp("tiny")
    student, teacher = save_tiny_pair(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return student, teacher, prompts
