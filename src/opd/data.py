"""Prompt data: files → rendered prompts with token ids and optional answers.

CONTRACT (implemented by the data helper):

``load_prompts(source, tokenizer, *, prompt_field="auto", answer_field="auto", prompt_template=None,
               use_chat_template=True, chat_template_kwargs=None, max_prompt_tokens=1024,
               system_prompt=None, limit=None) -> PromptSet``
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptExample:
    text: str  # the problem text after prompt_template, before the chat template
    rendered: str  # what the model sees (after the chat template, if used)
    input_ids: list[int]
    answer: str | None = None  # ground truth for grading, when the source has one
    meta: dict = field(default_factory=dict)


@dataclass
class PromptSet:
    examples: list[PromptExample]
    source: str
    dropped_overlong: int = 0
