"""Answer grading for math benchmarks: pure functions, no state, no model.

``grade(response, ground_truth)`` decides whether a response is correct. The checks, in this order:

1. **Extract.** The prediction is the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` in the
   response (nested braces handled, ``\\{``/``\\}`` escapes ignored), or the ``\\boxed 5`` short form.
   No box, an empty box, or an unclosed last box (a truncated response) → ``False``. If the ground truth
   is itself boxed, its box content is used.
2. **Normalised string equality.** ``normalize_answer(pred) == normalize_answer(truth)`` → ``True``.
3. **Exact numbers.** If both normalised strings are literal numbers (``142``, ``-0.5``, ``3/4``,
   ``\\frac{3}{4}``, ``1\\frac{4}{5}``, ``7.4e-12``, ``7.4\\times10^{-12}``, ``10^{5}``), they are compared
   as exact rationals (:class:`fractions.Fraction`) and this decision is final: ``"142.0"`` vs ``"142"``
   and ``"0.5"`` vs ``"\\frac12"`` are ``True``; ``"0.3333"`` vs ``"1/3"``, ``"7.4e-12"`` vs ``"8.4e-12"``
   and ``11111111100`` vs ``11111111101`` are ``False``. A number with a base subscript (``52_8``) is
   decided by the string check alone (the symbolic parser drops the subscript).
4. **Symbolic.** Otherwise each side is parsed whole with math-verify (``\\boxed{...}`` only, first
   match, no fallback: an answer the parser can read only a fragment of, such as
   ``\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}``, does not parse, and is then ``False``).

   - Two constant expressions (``\\frac{\\sqrt{3}}{3}``, ``2\\pi``, ``7.4 \\times 10^{-12}``) are evaluated to
     30 digits and equal iff ``|a - b| <= NUMERIC_REL_TOL * max(|a|, |b|)`` (relative, ``1e-9``). There is
     no absolute floor: when one side is exactly 0 the other must simplify to exactly 0.
   - Tuples, sets, intervals (and unions of them) and matrices whose entries are all constants are
     compared entry by entry with the same rule (sets in any order; intervals with their open/closed ends).
   - Anything with free symbols (``x^2+2x+1`` vs ``(x+1)^2``), relations and mixed types go to
     ``math_verify.verify`` (symbolic simplification).

   Any exception, a parse that yields nothing, or a timeout → ``False``; a time-out is never a match.

math-verify implements its timeouts with ``SIGALRM``, which only works on the main thread. On the main
thread each parse, the constant comparison and ``verify`` run under ``MATH_VERIFY_TIMEOUT_S`` each; on any
other thread (e.g. a grading thread pool) the timeouts are off (``parsing_timeout=None`` /
``timeout_seconds=None``): there the caller owns the time limit. The pre-checks (2, 3) catch the vast
majority of answers without sympy. ``docs/grading.md`` states the whole procedure and where it differs
from the study's grader.

``normalize_answer`` is deliberately light (it is applied to both sides, so it only has to be
consistent): see its docstring for the exact list of rewrites.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from fractions import Fraction

__all__ = [
    "extract_boxed",
    "normalize_answer",
    "grade",
    "grade_batch",
    "MATH_VERIFY_TIMEOUT_S",
    "NUMERIC_REL_TOL",
]

MATH_VERIFY_TIMEOUT_S = 2
"""Per-step timeout (whole seconds, ``SIGALRM``) of the symbolic path when grading on the main thread.
A time-out grades ``False``."""

NUMERIC_REL_TOL = 1e-9
"""Relative tolerance for constant expressions that are not both exact literals (``\\pi`` vs
``3.14159265359``). Loose enough for float round-off (~1e-16) and for decimals given to 10 significant
digits; tight enough that changing any digit of an answer with up to 9 significant digits is a miss.
Literal numbers never use it: they compare exactly."""

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
    - ``{,}`` → ``,``; all whitespace removed; ``_{5}`` → ``_5`` (one-character subscripts); thousands commas (``10,080`` → ``10080``, whole string only);
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
    s = re.sub(r"_\{(\w)\}", r"_\1", s)
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


_SCI_LATEX_RE = re.compile(
    r"^(?P<mant>[-+]?(?:\d+\.?\d*|\.\d+))(?:\\times|\\cdot|\*|×)10\^(?:\{(?P<e1>[-+]?\d+)\}|(?P<e2>[-+]?\d))$"
)
_POW10_RE = re.compile(r"^(?P<sign>[-+]?)10\^(?:\{(?P<e1>[-+]?\d+)\}|(?P<e2>[-+]?\d))$")
_BASE_SUBSCRIPT_RE = re.compile(r"(?<![A-Za-z0-9_\\])\d+_\{?\d+\}?")
_MAX_EXPONENT = 400  # larger powers of ten go to the symbolic path instead of building huge integers


def _to_fraction(s: str) -> Fraction | None:
    r"""The exact rational value of a normalised literal number, else None.

    Literals: ``-1.5``, ``7.4e-12``, ``3/4``, ``\frac{3}{4}``, ``-\frac{3}{4}``, ``1\frac{4}{5}`` (mixed
    number), ``7.4\times10^{-12}`` / ``7.4\cdot10^{-12}``, ``10^{5}``. A zero denominator or an exponent
    beyond ±400 gives None.
    """
    if _NUMBER_RE.match(s):
        m = re.search(r"[eE]([-+]?\d+)$", s)
        if m and abs(int(m.group(1))) > _MAX_EXPONENT:
            return None
        return Fraction(s)
    m = _SCI_LATEX_RE.match(s)
    if m:
        e = int(m.group("e1") or m.group("e2"))
        return Fraction(m.group("mant")) * Fraction(10) ** e if abs(e) <= _MAX_EXPONENT else None
    m = _POW10_RE.match(s)
    if m:
        e = int(m.group("e1") or m.group("e2"))
        if abs(e) > _MAX_EXPONENT:
            return None
        return (-1 if m.group("sign") == "-" else 1) * Fraction(10) ** e
    m = re.fullmatch(r"([-+]?)(\d+)?\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if m:
        sign, whole, num, den = m.groups()
        if Fraction(den) == 0:
            return None
        v = Fraction(num) / Fraction(den) + (Fraction(whole) if whole else 0)
        return -v if sign == "-" else v
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
    if m:
        if Fraction(m.group(2)) == 0:
            return None
        return Fraction(m.group(1)) / Fraction(m.group(2))
    return None


# ---------------------------------------------------------------------------------------------------------
# symbolic path (math-verify)
# ---------------------------------------------------------------------------------------------------------


def _timeout() -> int | None:
    """``MATH_VERIFY_TIMEOUT_S`` on the main thread; None (no SIGALRM) on any other thread."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_whole(answer: str, timeout: int | None):
    """math-verify's parse of the whole ``answer`` (a sympy object), or None.

    Only the ``\\boxed{answer}`` match is tried (``first_match``, ``no_fallback``): math-verify's default
    would, when the whole answer does not parse, return a fragment of it (``\\frac{1}{3} E_{1}+\\frac{2}{3}
    E_{2}`` parses as ``2/3`` that way) plus the raw string; either would compare equal to a different
    answer with the same fragment or be meaningless.
    """
    from math_verify import LatexExtractionConfig, parse  # lazy: ~1 s to import (sympy), symbolic path only

    parsed = parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(try_extract_without_anchor=False)],
        extraction_mode="first_match",
        fallback_mode="no_fallback",
        parsing_timeout=timeout,
    )
    return parsed[0] if parsed and not isinstance(parsed[0], str) else None


def _is_constant(x) -> bool:
    import sympy  # lazy: ~1 s to import (sympy), symbolic path only

    return isinstance(x, sympy.Expr) and bool(x.is_number)


def _all_constant(x) -> bool:
    """``x`` is a constant, or a tuple / set / interval / union / matrix with only constants inside."""
    import sympy  # lazy: ~1 s to import (sympy), symbolic path only

    if _is_constant(x):
        return True
    if isinstance(x, sympy.MatrixBase):
        return all(_is_constant(e) for e in x)
    if isinstance(x, sympy.Interval):
        return _all_constant(x.start) and _all_constant(x.end)
    if isinstance(x, (sympy.Tuple, sympy.FiniteSet, sympy.Union)):
        return all(_all_constant(e) for e in x.args)
    return False


def _constants_close(a, b) -> bool:
    """Two constant sympy expressions equal: exactly, or to ``NUMERIC_REL_TOL`` relative at 30 digits."""
    import sympy  # lazy: ~1 s to import (sympy), symbolic path only

    if a == b:
        return True
    if a.is_Rational and b.is_Rational:  # exact values (integers, fractions): exact comparison
        return False
    va, vb = sympy.N(a, 30), sympy.N(b, 30)
    if not (va.is_finite and vb.is_finite):
        return False
    if va == 0 or vb == 0:  # no absolute floor: a zero matches only what simplifies to exactly zero
        return sympy.simplify(a - b) == 0
    return bool(abs(va - vb) <= NUMERIC_REL_TOL * max(abs(va), abs(vb)))


def _structure_equal(a, b) -> bool | None:
    """Compare constants, and tuples / finite sets / intervals / unions / matrices of constants, with
    :func:`_constants_close`. None when either side holds a free symbol or the two types differ: then
    math-verify's ``verify`` decides (it also knows that an open interval and a pair are alike)."""
    import sympy  # lazy: ~1 s to import (sympy), symbolic path only

    if _is_constant(a) and _is_constant(b):
        return _constants_close(a, b)
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        if not all(_is_constant(x) for x in [*a, *b]):
            return None
        return a.shape == b.shape and all(_constants_close(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return None
    if isinstance(a, sympy.Tuple):
        parts = [_structure_equal(x, y) for x, y in zip(a.args, b.args)] if len(a) == len(b) else [False]
    elif isinstance(a, sympy.Interval):
        if (a.left_open, a.right_open) != (b.left_open, b.right_open):
            return False
        parts = [_structure_equal(a.start, b.start), _structure_equal(a.end, b.end)]
    elif isinstance(a, (sympy.FiniteSet, sympy.Union)):
        xs, ys = list(a.args), list(b.args)
        if len(xs) != len(ys):
            return False
        parts = []
        for x in xs:  # greedy matching in any order
            hit = next((j for j, y in enumerate(ys) if _structure_equal(x, y)), None)
            if hit is None and not all(_all_constant(v) for v in (x, *ys)):
                return None
            parts.append(hit is not None)
            if hit is not None:
                ys.pop(hit)
    else:
        return None
    if any(p is None for p in parts):
        return None
    return all(parts)


def _math_verify_equal(pred: str, truth: str) -> bool:
    """The symbolic verdict on ``pred`` vs ``truth`` (step 4 of the module docstring); False on any error,
    an unparseable side, or a timeout."""
    try:
        from math_verify import verify  # lazy: ~1 s to import (sympy), symbolic path only
        from math_verify.errors import TimeoutException
        from math_verify.utils import timeout as with_timeout
    except ImportError:  # pragma: no cover - math-verify is a hard dependency
        log.warning("math-verify is not installed (pip install math-verify); symbolic grading disabled")
        return False
    timeout = _timeout()
    try:
        gold = _parse_whole(truth, timeout)
        target = _parse_whole(pred, timeout)
        if gold is None or target is None:
            return False
        verdict = with_timeout(timeout)(_structure_equal)(gold, target)
        if verdict is not None:
            return verdict
        return bool(verify(gold, target, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # sympy raises many kinds; TimeoutException is a BaseException
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
    fa, fb = _to_fraction(a), _to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    if _BASE_SUBSCRIPT_RE.search(a) or _BASE_SUBSCRIPT_RE.search(b):
        return False  # "52_8": the symbolic parser would drop the base
    return _math_verify_equal(pred, truth)


def grade_batch(responses: Sequence[str], truths: Sequence[str]) -> list[bool]:
    """``[grade(r, t) for r, t in zip(responses, truths)]``; the two sequences must have equal length."""
    if len(responses) != len(truths):
        raise ValueError(
            f"grade_batch: got {len(responses)} responses but {len(truths)} ground truths; "
            "pass one ground truth per response (repeat a prompt's answer for each of its samples)"
        )
    return [grade(r, t) for r, t in zip(responses, truths)]
