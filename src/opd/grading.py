"""Answer grading for math benchmarks: pure functions, no state, no model.

``grade(response, ground_truth)`` decides whether a response is correct. The checks, in this order:

1. **Extract.** The prediction is the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` in the
   response (nested braces handled, ``\\{``/``\\}`` escapes ignored), or the ``\\boxed 5`` short form.
   No box, an empty box, or an unclosed last box (a truncated response) → ``False``. If the ground truth
   is itself boxed, its box content is used.
2. **Normalised string equality.** ``normalize_answer(pred) == normalize_answer(truth)`` → ``True``.
3. **Numeric equality.** If both normalised strings are plain numbers (``142``, ``-0.5``, ``3/4``,
   ``\\frac{3}{4}``, ``1\\frac{4}{5}``), the answer is ``math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)``
   and this decision is final (``"142.0"`` vs ``"142"`` is ``True``; ``"0.3333"`` vs ``"1/3"`` is ``False``).
4. **math-verify.** Otherwise both sides are parsed with ``math_verify.parse`` (each wrapped as
   ``\\boxed{...}``) and compared with ``math_verify.verify(gold, pred)`` (symbolic, sets / intervals /
   tuples / matrices, relations). Any exception, a parse that yields nothing, or a timeout → ``False``.

math-verify implements its timeouts with ``SIGALRM``, which only works on the main thread. On the main
thread we keep its timeouts (``MATH_VERIFY_TIMEOUT_S`` per call); on any other thread (e.g. a grading
thread pool) we pass ``parsing_timeout=None`` / ``timeout_seconds=None``, which disables them: there the
caller owns the time limit. The pre-checks (2, 3) catch the vast majority of answers without sympy.

``normalize_answer`` is deliberately light (it is applied to both sides, so it only has to be
consistent): see its docstring for the exact list of rewrites.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence

__all__ = ["extract_boxed", "normalize_answer", "grade", "grade_batch", "MATH_VERIFY_TIMEOUT_S"]

MATH_VERIFY_TIMEOUT_S = 5
"""Per-call math-verify timeout (seconds) when grading on the main thread."""

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or None if unclosed.

    A backslash escapes the next character, so ``\\{`` / ``\\}`` (literal braces in LaTeX) do not count.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (stripped), else None.

    Handles nested braces (``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``) and the brace-less short form
    ``\\boxed 5`` (content runs to the next whitespace or ``$``). For ``\\boxed{\\boxed{5}}`` the inner
    box is the last one, giving ``5``. If the last box is never closed (a truncated response) the result
    is None: an earlier box is not used in its place.
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        close = _match_braces(text, i)
        if close is None:
            return None
        content = text[i + 1 : close].strip()
        return content or None
    if i == m.end():  # "\boxed5" is not the short form; it needs a space
        return None
    short = re.match(r"[^\s$]+", text[i:])
    return short.group(0) if short else None


# ---------------------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    r"(?:units?|degrees?|cm|m|km|mm|inches|inch|in|feet|foot|ft|yards?|miles?|meters?|metres?|"
    r"centimeters?|seconds?|minutes?|hours?|days?|weeks?|years?|cents?|dollars?|pounds?|square|sq|"
    r"cubic|mph|kg|g|grams?|liters?|litres?|ml|percent)"
)
_TRAILING_UNIT_RE = re.compile(
    r"^(?P<num>[-+]?(?:[\d.,]*\d)?(?:\\frac\{\d+\}\{\d+\})?)\s*"
    r"(?:\\(?:text|textbf|mbox|mathrm|rm)\s*\{\s*(?:" + _UNIT_WORDS + r"\s*)+\}|\s" + _UNIT_WORDS + r")"
    r"(?:\^\{?[23]\}?)?$"
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mbox|mathrm|mathbf|rm|operatorname)\s*\{")
_SPACING_RE = re.compile(r"\\\\|\\[!,;: ]|~")  # keep "\\" (matrix row break), drop "\!" "\," ...
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def _unwrap_command(s: str, cmd_re: re.Pattern) -> str:
    """Replace every ``\\cmd{X}`` matched by ``cmd_re`` (which ends at the ``{``) with ``X``."""
    while True:
        m = cmd_re.search(s)
        if not m:
            return s
        close = _match_braces(s, m.end() - 1)
        if close is None:
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` → ``\frac{1}{2}``, ``\frac 59`` → ``\frac{5}{9}``, ``\frac43`` → ``\frac{4}{3}``,
    ``\frac9{19}`` → ``\frac{9}{19}``, ``\frac{270}7`` → ``\frac{270}{7}``."""
    out = []
    parts = s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        args: list[str] = []
        rest = part
        for _ in range(2):
            if not args or not rest.startswith("{"):  # "\frac 59": spaces may precede the arguments
                stripped = rest.lstrip(" ")
                rest = stripped if stripped[:1].isalnum() or stripped[:1] == "{" else rest
            if rest.startswith("{"):
                close = _match_braces(rest, 0)
                if close is None:
                    break
                args.append(rest[: close + 1])
                rest = rest[close + 1 :]
            elif rest and (rest[0].isalnum()):
                args.append("{" + rest[0] + "}")
                rest = rest[1:]
            else:
                break
        out.append("\\frac" + "".join(args) + rest)
    return "".join(out)


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt2`` → ``\sqrt{2}`` (single character argument)."""
    return re.sub(r"\\sqrt(?![A-Za-z{\[])\s*(\w)", r"\\sqrt{\1}", s)


def _canon_number(s: str) -> str:
    """``+007.50`` → ``7.5``, ``.5`` → ``0.5``, ``142.0`` / ``142.`` → ``142``, ``-0`` → ``0``."""
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-")
    int_part, _, frac = s.partition(".")
    frac = frac.rstrip("0")
    out = (int_part.lstrip("0") or "0") + ("." + frac if frac else "")
    return ("" if out == "0" else sign) + out


def normalize_answer(s: str) -> str:
    r"""Canonical string form of a math answer, for equality tests. Rewrites, in order:

    - a ``\boxed{...}`` wrapper is removed; surrounding ``$`` / ``\(\)`` / ``\[\]`` dropped;
    - ``\!``, ``\,``, ``\;``, ``\:``, ``\ ``, ``~`` (LaTeX spacing) removed; ``\left`` / ``\right`` removed;
    - ``\dfrac`` / ``\tfrac`` → ``\frac``; ``\frac12`` → ``\frac{1}{2}``; ``\sqrt2`` → ``\sqrt{2}``;
    - degrees (``^\circ``, ``^{\circ}``, ``°``), ``\$`` / ``$``, ``\%`` / ``%`` removed;
    - units-light: a trailing unit after a number (``5.4 \text{ cents}``, ``864 \mbox{ inches}^2``,
      ``12 cm``) is dropped; other ``\text{X}`` / ``\mbox{X}`` / ``\mathrm{X}`` → ``X``;
    - a short left-hand side ``x = 5`` → ``5`` (one or two characters before a single ``=``);
    - ``{,}`` → ``,``; all whitespace removed; thousands commas (``10,080`` → ``10080``, whole string only);
    - numbers: ``.5`` → ``0.5``, ``+5`` → ``5``, ``142.0`` / ``142.`` → ``142``, ``2.50`` → ``2.5``;
      a trailing sentence ``.`` is removed.
    """
    if s is None:
        return ""
    s = str(s).strip()
    inner = extract_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    if inner is not None:
        s = inner
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2]
    s = s.strip().strip("$").strip()
    s = s.replace("\n", " ")
    s = _SPACING_RE.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)
    s = re.sub(r"\\left(?![A-Za-z])", "", s)
    s = re.sub(r"\\right(?![A-Za-z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _fix_fracs(s)
    s = _fix_sqrt(s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.strip()
    m = _TRAILING_UNIT_RE.match(s)
    if m and m.group("num").lstrip("+-"):
        s = m.group("num")
    s = _unwrap_command(s, _TEXT_CMD_RE)
    s = s.replace("{,}", ",")
    s = re.sub(r"^[A-Za-z]\s*\\in(?![A-Za-z])", "", s.strip())
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2 and rhs.strip():
            s = rhs
    s = re.sub(r"\s+", "", s)
    if s.endswith(".") and not _NUMBER_RE.match(s):
        s = s[:-1]
    choice = re.fullmatch(r"\(([A-Ea-e])\)", s)
    if choice:
        s = choice.group(1).upper()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _NUMBER_RE.match(s) and "e" not in s.lower():
        s = _canon_number(s)
    return s


def _to_number(s: str) -> float | None:
    r"""A plain number from a normalised string: ``-1.5``, ``3/4``, ``\frac{3}{4}``, ``-\frac{3}{4}``,
    ``1\frac{4}{5}`` (mixed number). None for anything else."""
    if _NUMBER_RE.match(s):
        try:
            return float(s)
        except ValueError:
            return None
    m = re.fullmatch(r"([-+]?)(\d+)?\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if m:
        sign, whole, num, den = m.groups()
        if float(den) == 0:
            return None
        v = float(num) / float(den) + (float(whole) if whole else 0.0)
        return -v if sign == "-" else v
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
    if m:
        if float(m.group(2)) == 0:
            return None
        return float(m.group(1)) / float(m.group(2))
    return None


# ---------------------------------------------------------------------------------------------------------
# math-verify fallback
# ---------------------------------------------------------------------------------------------------------


def _math_verify_equal(pred: str, truth: str) -> bool:
    """math-verify's verdict on boxed ``pred`` vs boxed ``truth``; False on any error or timeout."""
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a hard dependency
        log.warning("math-verify is not installed (pip install math-verify); symbolic grading disabled")
        return False
    on_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if on_main else None
    try:
        gold = parse("\\boxed{" + truth + "}", parsing_timeout=timeout)
        target = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        if not gold or not target:
            return False
        return bool(verify(gold, target, timeout_seconds=timeout))
    except Exception:  # math-verify / sympy raise many kinds (incl. its TimeoutException): not a match
        return False


def grade(response: str, ground_truth: str) -> bool:
    """True when the last boxed answer in ``response`` matches ``ground_truth`` (see module docstring)."""
    pred = extract_boxed(response)
    if pred is None or ground_truth is None:
        return False
    truth = str(ground_truth).strip()
    if _BOX_RE.search(truth):
        truth = extract_boxed(truth) or truth
    if not truth:
        return False
    a, b = normalize_answer(pred), normalize_answer(truth)
    if a == b:
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return math.isclose(na, nb, rel_tol=1e-9, abs_tol=1e-12)
    return _math_verify_equal(pred, truth)


def grade_batch(responses: Sequence[str], truths: Sequence[str]) -> list[bool]:
    """``[grade(r, t) for r, t in zip(responses, truths)]``; the two sequences must have equal length."""
    if len(responses) != len(truths):
        raise ValueError(
            f"grade_batch: got {len(responses)} responses but {len(truths)} ground truths; "
            "pass one ground truth per response (repeat a prompt's answer for each of its samples)"
        )
    return [grade(r, t) for r, t in zip(responses, truths)]
