"""Prompt data: files → rendered prompts with token ids and optional answers.

``load_prompts(source, tokenizer, ...) -> PromptSet`` reads a prompt pool or benchmark and turns every
row into a :class:`PromptExample`: the problem text (after ``prompt_template``), the string the model
sees (after the tokenizer's chat template), its token ids and the ground-truth answer. :func:`opd.datafiles.read_rows`
is the lower layer (source → list of dict rows); :class:`opd.sampler.PromptSampler` draws prompt
indices for training, epoch by epoch, resumably.

Sources (:mod:`opd.datafiles`):
  ``*.jsonl``, ``*.json`` (a list of objects), ``*.parquet``, ``*.csv``, a directory written by
  ``datasets.Dataset.save_to_disk`` (needs ``pip install opd[datasets]``), and ``lab:<split>`` for
  the built-in lab's prompt splits (rows with ``prompt`` and ``answer``).

Field mapping (``load_prompts``):
  - prompt: ``prompt_field="auto"`` takes the first of ``prompt, problem, question, input, instruction``
    present in the first row. The value is a string, or a verl-style list of chat messages
    ``[{"role": ..., "content": ...}, ...]`` that is used as the conversation as is.
  - answer: ``answer_field="auto"`` takes the first of ``reward_model.ground_truth, answer, solution,
    ground_truth, final_answer`` present in the first row, or no answers if none is. Dotted names walk
    nested dicts. A GSM8K rationale ending ``#### N`` becomes ``N``. ``answer_field=None``: no answers.
  Explicitly named fields that a row lacks are an error naming the file, the row and the fields it has.

Prompt text:
  - ``prompt_template`` (e.g. ``"{problem} Please reason step by step, and put your final answer
    within \\boxed{}."``) replaces only the ``{problem}`` / ``{prompt}`` placeholder, never via
    ``str.format``, so literal braces such as ``\\boxed{}`` survive. With chat messages it applies to the
    last user message only.
  - The DAPO-Math-17K ``\\boxed`` variant ships the artefact ``\\boxed{{}}`` (a ``str.format`` escape that
    was never formatted). Every prompt text and template is normalised ``\\boxed{{}}`` → ``\\boxed{}``,
    so the model sees the same instruction as with a clean template.
  - ``use_chat_template=True`` renders ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True, **chat_template_kwargs)`` (e.g. ``{"enable_thinking": False}``) and
    tokenises with ``add_special_tokens=False`` (the template already wrote the special tokens);
    otherwise the text is used raw and tokenised with the tokenizer's defaults (e.g. its BOS).
  - Prompts longer than ``max_prompt_tokens`` are dropped, counted in ``PromptSet.dropped_overlong`` and
    logged once with the count.

Row order, ``limit`` and ``seed``: with ``seed`` the rows are shuffled (deterministically) first;
then rows are rendered in order until ``limit`` prompts are kept, so ``limit`` counts kept prompts and
only the rows visited are validated and counted as dropped.

Exclusion (``exclude``, the ``exclude_prompts`` key of the methods): a row is left out when its prompt
text, before or after ``prompt_template``, is exactly one of the given texts (no normalisation);
:func:`prompt_texts` reads them from any source, e.g. an SFT run's ``teacher_data.jsonl`` (whose
``prompt`` field is the problem text after the template). Left-out rows are counted in
``PromptSet.excluded`` and logged; they do not count towards ``limit``.
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols

from opd.datafiles import _short, read_rows

__all__ = [
    "PromptExample",
    "PromptSet",
    "load_prompts",
    "prompt_texts",
    "rendering",
    "PROMPT_FIELDS",
    "ANSWER_FIELDS",
]

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "problem", "question", "input", "instruction")
"""Fields tried, in order, by ``prompt_field="auto"``."""
ANSWER_FIELDS = ("reward_model.ground_truth", "answer", "solution", "ground_truth", "final_answer")
"""Fields tried, in order, by ``answer_field="auto"`` (dotted names walk nested dicts)."""
PLACEHOLDERS = ("{problem}", "{prompt}")
"""Placeholders a ``prompt_template`` may use for the problem text."""
_BOXED_ARTEFACT = "\\boxed{{}}"
META_FIELDS = ("data_source", "id", "difficulty")
"""Row fields kept in ``PromptExample.meta`` (evaluation reports accuracy per ``difficulty``)."""


@dataclass
class PromptExample:
    text: str  # the problem text after prompt_template, before the chat template
    rendered: str  # what the model sees (after the chat template, if used)
    input_ids: list[int]
    answer: str | None = None  # ground truth for grading, when the source has one
    meta: dict = field(default_factory=dict)  # {"row": index in the source, plus the META_FIELDS present}
    # the teacher's rendering when teacher_prompt_template / teacher_system_prompt is set, else None
    teacher_input_ids: list[int] | None = None


@dataclass
class PromptSet:
    examples: list[PromptExample]
    source: str
    dropped_overlong: int = 0  # rows dropped because their prompt exceeded max_prompt_tokens
    prompt_field: str | None = None  # the field the prompts were read from (resolved from "auto")
    answer_field: str | None = None  # the field the answers were read from; None: no answers
    excluded: int = 0  # rows left out because their prompt text is in ``exclude``

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


# ---------------------------------------------------------------------------------------------------------
# rows → prompts
# ---------------------------------------------------------------------------------------------------------

_MISSING = object()


def _get_field(row: dict, name: str) -> Any:
    """``row[name]``, or the dotted path ``a.b.c`` through nested dicts; ``_MISSING`` if absent."""
    if name in row:
        return row[name]
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _resolve_field(row: dict, requested: str | None, candidates: tuple[str, ...]) -> str | None:
    if requested != "auto":
        return requested
    for name in candidates:
        v = _get_field(row, name)
        if v is not _MISSING and v is not None:
            return name
    return None


RENDER_KEYS = ("prompt_field", "answer_field", "prompt_template", "use_chat_template", "chat_template_kwargs")
"""The data keys of a config (:class:`opd.config.DataConfig`) that say how a row's prompt and answer are
found and rendered: :func:`load_prompts` arguments of the same names."""


def rendering(cfg: Any) -> dict[str, Any]:
    """The :data:`RENDER_KEYS` of ``cfg`` as :func:`load_prompts` keyword arguments, so every command
    renders a config's prompts alike."""
    return {key: getattr(cfg, key) for key in RENDER_KEYS}


def resolve_prompt_field(row0: dict, requested: str, where: str) -> str:
    """The prompt field of a source whose first row is ``row0``: ``requested``, or for ``"auto"`` the first
    of :data:`PROMPT_FIELDS` with a value there; a ValueError naming ``where`` and the fix if none has."""
    p_field = _resolve_field(row0, requested, PROMPT_FIELDS)
    if p_field is None:
        raise ValueError(
            f"{where}: row 0 has none of the prompt fields {list(PROMPT_FIELDS)} (fields: "
            f"{sorted(row0)}); pass prompt_field=<name>"
        )
    return p_field


def apply_template(text: str, template: str | None) -> str:
    """``template`` with its ``{problem}`` / ``{prompt}`` placeholder replaced by ``text``.

    Only the placeholder is substituted (no ``str.format``): other braces, e.g. ``\\boxed{}``, stay. The
    ``\\boxed{{}}`` artefact is normalised to ``\\boxed{}`` in the result.
    """
    if template is not None:
        for ph in PLACEHOLDERS:
            if ph in template:
                text = template.replace(ph, text)
                break
        else:
            raise ValueError(
                f"prompt_template {_short(template)} has no placeholder; put {PLACEHOLDERS[0]} (or "
                f"{PLACEHOLDERS[1]}) where the problem text goes"
            )
    return text.replace(_BOXED_ARTEFACT, "\\boxed{}")


def _clean_answer(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    s = str(value).strip()
    if "####" in s:  # GSM8K: rationale, then "#### N"
        s = s.rsplit("####", 1)[1].strip()
    return s


def load_prompts(
    source: str | Path,
    tokenizer,
    *,
    prompt_field: str = "auto",
    answer_field: str | None = "auto",
    prompt_template: str | None = None,
    use_chat_template: bool = True,
    chat_template_kwargs: dict | None = None,
    system_prompt: str | None = None,
    teacher_prompt_template: str | None = None,
    teacher_system_prompt: str | None = None,
    max_prompt_tokens: int | None = 1024,
    limit: int | None = None,
    seed: int | None = None,
    max_prompt_tokens_why: str | None = None,
    rows: list[dict] | None = None,
    exclude: Collection[str] | None = None,
) -> PromptSet:
    """Load, template, render and tokenise the prompts of ``source`` (see the module docstring).

    Args:
        source: file, ``save_to_disk`` directory or ``lab:<split>``.
        tokenizer: a Hugging Face tokenizer (the student's; teacher and student share it).
        prompt_field: field holding the prompt (string or chat messages); ``"auto"`` tries ``PROMPT_FIELDS``.
        answer_field: field holding the ground truth (dotted paths allowed); ``"auto"`` tries
            ``ANSWER_FIELDS`` and yields no answers if none exists; ``None`` skips answers.
        prompt_template: text with a ``{problem}`` or ``{prompt}`` placeholder, applied to the problem
            (to the last user message of a chat prompt).
        use_chat_template: render with ``tokenizer.apply_chat_template``; False uses the text raw.
        chat_template_kwargs: extra keyword arguments for the chat template, e.g. ``{"enable_thinking": False}``.
        system_prompt: a system message put before each conversation (needs the chat template).
        teacher_prompt_template / teacher_system_prompt: either set: each prompt is rendered again, by
            the same tokenizer, with these in place of ``prompt_template`` / ``system_prompt`` (None: the
            student's), as ``PromptExample.teacher_input_ids``; rows with either rendering over
            ``max_prompt_tokens`` are dropped.
        max_prompt_tokens: prompts with more tokens are dropped and counted; None keeps all.
        limit: stop after this many kept prompts.
        seed: shuffle the rows with this seed before applying ``limit``.
        max_prompt_tokens_why: where ``max_prompt_tokens`` came from when the caller lowered it (e.g.
            to fit the model's context), quoted in the drop log and the no-prompts-left error.
        rows: the rows of ``source`` already read (e.g. a benchmark from :func:`opd.benchmarks.load_benchmark`);
            ``source`` then only names them in messages. None: ``read_rows(source)``.
        exclude: prompt texts to leave out (exact match of the text before or after ``prompt_template``;
            :func:`prompt_texts` reads them from a file); the count is ``PromptSet.excluded``.
    """
    name = str(source)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: must be a positive number of prompts, or None for all")
    if max_prompt_tokens is not None and max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}: must be positive, or None for no limit")
    for key, value in (("system_prompt", system_prompt), ("teacher_system_prompt", teacher_system_prompt)):
        if value is not None and not use_chat_template:
            raise ValueError(
                f"{key} is set but use_chat_template=False: a system message needs the chat template; "
                "set use_chat_template=True or put the instruction into the prompt template"
            )
    for_teacher = teacher_prompt_template is not None or teacher_system_prompt is not None
    t_template = prompt_template if teacher_prompt_template is None else teacher_prompt_template
    t_system = system_prompt if teacher_system_prompt is None else teacher_system_prompt
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"use_chat_template=True but the tokenizer ({type(tokenizer).__name__}) has no chat_template; "
            "pass use_chat_template=False to feed the prompt text raw, or use the model's chat tokenizer"
        )
    if chat_template_kwargs and not use_chat_template:
        raise ValueError(
            f"chat_template_kwargs={chat_template_kwargs} given but use_chat_template=False; drop one of them"
        )
    tmpl_kwargs = dict(chat_template_kwargs or {})
    if tmpl_kwargs:
        warn_unread_template_kwargs(tokenizer, tmpl_kwargs)

    rows = read_rows(source) if rows is None else rows
    if not rows:
        raise ValueError(f"prompt source {name!r} has no rows; check the file or the split name")

    p_field = resolve_prompt_field(rows[0], prompt_field, name)
    a_field = _resolve_field(rows[0], answer_field, ANSWER_FIELDS)

    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)

    examples: list[PromptExample] = []
    dropped = excluded = 0
    for i in order:
        row = rows[i]
        text, messages = _prompt_of(row, i, name, p_field, prompt_template, system_prompt)
        if exclude and (text in exclude or _raw_prompt_text(_get_field(row, p_field)) in exclude):
            excluded += 1
            continue
        rendered, ids = _render(tokenizer, text, messages, use_chat_template, tmpl_kwargs, name, i)
        t_ids = None
        if for_teacher:
            t_text, t_messages = _prompt_of(row, i, name, p_field, t_template, t_system)
            t_ids = _render(tokenizer, t_text, t_messages, use_chat_template, tmpl_kwargs, name, i)[1]
        if max_prompt_tokens is not None and max(len(ids), len(t_ids or ())) > max_prompt_tokens:
            dropped += 1
            continue
        answer = None
        if a_field is not None:
            value = _get_field(row, a_field)
            if value is _MISSING:
                raise ValueError(
                    f"{name}: row {i} has no answer field {a_field!r} (fields: {sorted(row)}); pass "
                    "answer_field=<name>, or answer_field=None to load prompts without answers"
                )
            answer = _clean_answer(value)
        meta: dict = {"row": i}
        for key in META_FIELDS:
            if key in row:
                meta[key] = row[key]
        examples.append(
            PromptExample(text, rendered, list(ids), answer, meta, None if t_ids is None else list(t_ids))
        )
        if limit is not None and len(examples) >= limit:
            break

    why = f" ({max_prompt_tokens_why})" if max_prompt_tokens_why else ""
    if excluded:
        log.info("%s: left out %d prompt(s) listed in the exclusion set", name, excluded)
    if not examples and excluded and not dropped:
        raise ValueError(
            f"{name}: no prompts left: all {excluded} prompt(s) are in the exclusion set (exclude_prompts); "
            "use a larger prompt pool or exclude fewer prompts"
        )
    if dropped:
        log.warning(
            "%s: dropped %d prompt(s) longer than max_prompt_tokens=%d%s; %d kept",
            name,
            dropped,
            max_prompt_tokens,
            why,
            len(examples),
        )
    if not examples:
        fix = (
            "lower max_new_tokens or use models with a longer context"
            if max_prompt_tokens_why
            else "raise max_prompt_tokens"
        )
        raise ValueError(
            f"{name}: no prompts left: {'all ' if not excluded else ''}{dropped} visited prompt(s) are longer than "
            f"max_prompt_tokens={max_prompt_tokens}{why}"
            + (f" and {excluded} are in the exclusion set" if excluded else "")
            + f"; {fix}"
        )
    return PromptSet(
        examples=examples,
        source=name,
        dropped_overlong=dropped,
        prompt_field=p_field,
        answer_field=a_field,
        excluded=excluded,
    )


def _raw_prompt_text(value: Any) -> str | None:
    """The prompt text of a prompt field's value before any template: the string itself, or the content
    of a chat list's last user message (None for anything else)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def prompt_texts(source: str | Path) -> set[str]:
    """The prompt texts of every row of ``source`` (any source :func:`read_rows` reads), for
    ``load_prompts(exclude=...)``: per row the first of :data:`PROMPT_FIELDS` it has, a string as is or a
    chat list's last user message. A row with none of them is an error naming the source and the row."""
    texts: set[str] = set()
    for i, row in enumerate(read_rows(source)):
        field_name = next((f for f in PROMPT_FIELDS if _get_field(row, f) not in (_MISSING, None)), None)
        text = _raw_prompt_text(_get_field(row, field_name)) if field_name else None
        if text is None:
            raise ValueError(
                f"{source}: row {i} has no prompt text in any of the fields {list(PROMPT_FIELDS)} (fields: "
                f"{sorted(row)}); an exclusion list needs one of them per row (e.g. teacher_data.jsonl's prompt)"
            )
        texts.add(text)
    return texts


# Variables ``apply_chat_template`` fills itself (plus the tokenizer's special tokens): not user kwargs.
_TEMPLATE_BUILTINS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "raise_exception"}
    | {"strftime_now", "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token"}
    | {"mask_token", "additional_special_tokens"}
)


def template_variables(chat_template: str | dict | None) -> set[str] | None:
    """Names a jinja chat template reads from its context (jinja2 ``meta.find_undeclared_variables``),
    over every named template when ``chat_template`` is a dict; None when it cannot be parsed."""
    if not chat_template:
        return None
    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    env = jinja2.Environment(extensions=[loopcontrols])
    names: set[str] = set()
    try:
        for src in sources:
            names |= meta.find_undeclared_variables(env.parse(src))
    except jinja2.TemplateSyntaxError:
        return None
    return names - set(env.globals)


def warn_unread_template_kwargs(tokenizer, chat_template_kwargs: dict) -> list[str]:
    """Warn (once per call) about ``chat_template_kwargs`` keys the tokenizer's chat template never reads,
    e.g. the typo ``enable_thinkin``: such a key is silently ignored. Returns the unread keys."""
    names = template_variables(getattr(tokenizer, "chat_template", None))
    if names is None:
        return []
    unread = [k for k in chat_template_kwargs if k not in names]
    if unread:
        readable = sorted(names - _TEMPLATE_BUILTINS)
        close = {k: difflib.get_close_matches(str(k), readable, n=1) for k in unread}
        hints = "; ".join(f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        log.warning(
            "chat_template_kwargs key(s) %s are never read by the chat template, so they change nothing; "
            "the template reads %s%s",
            ", ".join(repr(k) for k in unread),
            ", ".join(repr(n) for n in readable) if readable else "no extra keys",
            f" ({hints})" if hints else "",
        )
    return unread


def _render(
    tokenizer, text: str, messages: list[dict], use_chat_template: bool, tmpl_kwargs: dict, name: str, i: int
) -> tuple[str, list[int]]:
    """(what the model sees, its token ids) of one prompt: the chat template over ``messages``, or ``text`` raw."""
    if use_chat_template:
        try:
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **tmpl_kwargs
            )
        except Exception as e:
            raise ValueError(
                f"{name}: row {i}: the chat template failed on messages {_short(messages)}: {e}; check "
                "the messages' roles or pass use_chat_template=False"
            ) from e
        return rendered, tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return text, tokenizer(text)["input_ids"]


def _prompt_of(
    row: dict, i: int, name: str, p_field: str, template: str | None, system_prompt: str | None
) -> tuple[str, list[dict]]:
    """(problem text after the template, chat messages) of one row; errors name the file and row."""
    value = _get_field(row, p_field)
    if value is _MISSING:
        raise ValueError(
            f"{name}: row {i} has no prompt field {p_field!r} (fields: {sorted(row)}); pass "
            "prompt_field=<name> naming the field that holds the prompt"
        )
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name}: row {i}: prompt field {p_field!r} is empty; remove the row or fill it")
        text = apply_template(value, template)
        messages = [{"role": "user", "content": text}]
    elif isinstance(value, (list, tuple)):
        messages = _check_messages(value, i, name, p_field)
        last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError(
                f"{name}: row {i}: prompt field {p_field!r} is a message list without a 'user' message "
                f"(roles: {[m['role'] for m in messages]}); add the user turn"
            )
        text = apply_template(messages[last_user]["content"], template)
        messages[last_user]["content"] = text
        messages = [
            m if j == last_user else {**m, "content": apply_template(m["content"], None)}
            for j, m in enumerate(messages)
        ]
    else:
        raise ValueError(
            f"{name}: row {i}: prompt field {p_field!r} is a {type(value).__name__} ({_short(value)}), "
            "expected a string or a list of {'role', 'content'} messages"
        )
    if system_prompt is not None:
        if messages[0]["role"] == "system":
            raise ValueError(
                f"{name}: row {i} already has a system message; pass system_prompt=None to keep the "
                "data's own, or remove it from the data"
            )
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return text, messages


def _check_messages(value: list | tuple, i: int, name: str, p_field: str) -> list[dict]:
    if not value:
        raise ValueError(f"{name}: row {i}: prompt field {p_field!r} is an empty message list")
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f"{name}: row {i}: message {j} of prompt field {p_field!r} is {_short(m)}; each message "
                "must be {'role': str, 'content': str}"
            )
        if not m["content"].strip():
            raise ValueError(f"{name}: row {i}: message {j} ({m['role']}) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out
