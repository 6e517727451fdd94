"""Loading, saving and pairing student / teacher models.

Sources ``load_model`` / ``load_tokenizer`` accept:
- a local checkpoint directory (``config.json`` + safetensors, tokenizer files);
- a ``.gguf`` file, or a directory plus ``gguf_file=``: loaded through transformers' GGUF support and
  dequantised into ordinary dense, trainable parameters (needs the ``gguf`` package);
- ``lab:<name>``: a model of the lab zoo (resolved by ``opd.lab.resolve``);
- a hub id (``org/name``), only when online; offline (``HF_HUB_OFFLINE=1``) only what is in the local
  hub cache.

Why compatibility matters. OPD's teacher scores the student's own token ids: the reward at position t
is ``log q_t(ŷ_t) − log p_t(ŷ_t)`` with the *same* id ``ŷ_t`` in both models. If the two tokenizers map
a string to different ids, the teacher scores a different token and the objective is silently wrong, so
``check_compatibility`` refuses such pairs. Embedding tables are often padded past the tokenizer
(Qwen2.5: 151,665 ids, 151,936 or 152,064 rows); the rows past the tokenizer are never produced by
it, so logits are restricted to the first ``vocab_limit`` columns in both models. Special-token and chat
template differences are legal but change what the teacher sees, so they are reported as warnings.

Left out on purpose: LoRA / adapters, multi-device sharding (``device_map``), and quantised training;
every loaded model is a plain dense ``PreTrainedModel``.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.lab import LabModel
from opd.lab import resolve as resolve_lab
from opd.rollout import tokenizer_vocab_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


class TokenizerMismatchError(ValueError):
    """Student and teacher cannot be paired for OPD (different token ids, or a table too small)."""


class NonFiniteModelError(ValueError):
    """A model has NaN / inf weights, or produced non-finite log-probs; the message names the model."""


@dataclass
class CompatReport:
    """Result of ``check_compatibility``.

    ``vocab_limit``: number of leading logit columns both models share; restrict scoring to them.
    ``warnings``: legal differences that change what the teacher sees (one sentence each, with the fix).
    ``notes``: facts worth one log line that need no action (e.g. padded embedding tables).
    """

    vocab_limit: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- loading


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or the torch dtype itself) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(repr(k) for k in DTYPES)}")


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
):
    """Load a causal LM (see the module docstring for accepted sources) in ``dtype`` on ``device``.

    GGUF weights are dequantised on load, so the result is trainable and ``save_model`` writes it as
    safetensors. ``trust_remote_code`` runs the checkpoint's own Python code; leave it off unless you
    trust the source.
    """
    torch_dtype = resolve_dtype(dtype)
    source, gguf_name, local = _resolve_source(name_or_path, gguf_file, what="model")
    kwargs: dict = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if gguf_name is not None:
        kwargs.update(_gguf_kwargs(gguf_name))
    if not local and _hub_offline():
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as err:  # a .bin that torch's safe loader refused
        from opd.checkpoint import unsafe_pickle_error  # import cycle: opd.checkpoint imports this module

        bins = sorted(p.name for p in Path(source).glob("*.bin")) if local else []
        raise unsafe_pickle_error(Path(source) / bins[0] if len(bins) == 1 else source, err) from None
    except OSError as err:
        if local:
            raise
        raise FileNotFoundError(_not_found_message("model", name_or_path, err)) from err
    if not trust_remote_code:
        _drop_unused_auto_map(model, name_or_path)
    check_finite_weights(model, f"model {os.fspath(name_or_path)!r}")
    return model.to(device)


def _drop_unused_auto_map(model, name_or_path) -> None:
    """A config with ``auto_map`` names custom modelling code; with trust_remote_code off, transformers
    loads the built-in class for its ``model_type`` instead. Say so, and drop ``auto_map`` from the
    in-memory config: saved checkpoints do not ship that code, so an ``auto_map`` in them would point at
    files that are not there (or at code that never trained these weights)."""
    auto_map = getattr(model.config, "auto_map", None)
    if not auto_map:
        return
    custom = auto_map.get("AutoModelForCausalLM", auto_map) if isinstance(auto_map, dict) else auto_map
    log.warning(
        "model %r: its config.json names custom code (auto_map: %s) that was NOT used: trust_remote_code is "
        "off, so it was loaded as the built-in %s. If the custom code matters, check the source and pass "
        "trust_remote_code=true. auto_map is left out of the checkpoints this run saves.",
        os.fspath(name_or_path),
        custom,
        type(model).__name__,
    )
    del model.config.auto_map


def check_finite_weights(model, what: str) -> None:
    """Raise ``NonFiniteModelError`` naming ``what`` and the tensors if any parameter holds NaN / inf.

    Once at load time, one float32-accumulated sum per parameter (a NaN or inf makes the sum non-finite;
    a sum is ~30x faster than ``isfinite().all()``, which allocates a mask: ~0.15 s for 134M fp32
    parameters on one CPU thread); only a tensor whose sum is not finite gets the exact element check.
    """
    bad = []
    for pname, param in model.named_parameters():
        if not param.is_floating_point() or bool(torch.isfinite(param.sum(dtype=torch.float32))):
            continue
        nonfinite = ~torch.isfinite(param)
        if not bool(nonfinite.any()):
            continue  # a finite tensor whose sum overflowed
        rows = int(nonfinite.reshape(param.shape[0], -1).any(-1).sum()) if param.dim() else 1
        bad.append(f"{pname} ({int(nonfinite.sum())} value(s) in {rows} row(s))")
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteModelError(
            f"{what} has non-finite (NaN/inf) weights in {len(bad)} tensor(s): {shown}; every score it gives "
            "would be NaN. Fix: use an intact checkpoint (re-download or re-export it)."
        )


def check_finite_logp(role: str, name: str, logp_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> None:
    """Raise ``NonFiniteModelError`` if ``logp_B_T`` (log-probs of the scored tokens, 0 where
    ``mask_B_T`` is 0) is NaN / inf at any scored position. Costs one ``isfinite().all()`` on a (B, T)
    tensor that is already computed; the count is only taken when the check fails."""
    if bool(torch.isfinite(logp_B_T).all()):
        return
    bad_B_T = ~torch.isfinite(logp_B_T) & (mask_B_T > 0)
    raise NonFiniteModelError(
        f"{role} {name!r} produced non-finite log-probs at {int(bad_B_T.sum())} of {int((mask_B_T > 0).sum())} "
        f"scored positions (in {int(bad_B_T.any(-1).sum())} of {logp_B_T.shape[0]} sequences); no update was "
        f"made with them. Fix: check the {role}'s weights and dtype (float16 overflows easily; use "
        "float32 or bfloat16)."
    )


def context_length(model) -> int | None:
    """The model's maximum positions (``max_position_embeddings`` of its text config), or None."""
    config = model.config
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def prompt_token_cap(max_prompt_tokens: int, max_new_tokens: int, student, teacher) -> tuple[int, str | None]:
    """``(cap, why)``: ``max_prompt_tokens`` lowered so that prompt + ``max_new_tokens`` fits the shorter of
    the two models' contexts (``teacher=None``: the student's alone); ``why`` explains a lowered cap (None when ``max_prompt_tokens`` already fits).
    Raises ``ValueError`` when no prompt token would fit."""
    pairs = (("student", student), ("teacher", teacher))
    lengths = {role: context_length(m) for role, m in pairs if m is not None}  # teacher None: no teacher
    known = {role: n for role, n in lengths.items() if n is not None}
    if not known:
        return max_prompt_tokens, None
    context = min(known.values())
    detail = ", ".join(f"{role} {n}" for role, n in known.items())
    cap = context - max_new_tokens
    if cap <= 0:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the models' context is {context} "
            f"positions (max_position_embeddings: {detail}). Fix: set max_new_tokens below {context}."
        )
    if cap >= max_prompt_tokens:
        return max_prompt_tokens, None
    why = (
        f"capped from {max_prompt_tokens}: context {context} (max_position_embeddings: {detail}) minus "
        f"max_new_tokens={max_new_tokens}"
    )
    return cap, why


def same_model_warning(student_name: str, teacher_name: str, student, teacher) -> str | None:
    """A warning when student and teacher are the same model (same path, or identical weights), else None.

    Identical weights: equal parameter count and shapes, then three tensors (first, middle, last) equal,
    then, only if those match, every tensor (a pass over the weights that only identical pairs pay).
    """
    same_path = False
    try:
        s_src, _, s_local = _resolve_source(student_name, None, what="model")
        t_src, _, t_local = _resolve_source(teacher_name, None, what="model")
        same_path = (
            s_src == t_src if not (s_local and t_local) else Path(s_src).resolve() == Path(t_src).resolve()
        )
    except (OSError, ValueError):
        same_path = os.fspath(student_name) == os.fspath(teacher_name)
    if not (same_path or identical_weights(student, teacher)):
        return None
    how = "the same model path" if same_path else "identical weights"
    return (
        f"student and teacher are the same model ({how}: {os.fspath(student_name)!r}, {os.fspath(teacher_name)!r}): "
        "the teacher's log-probs equal the student's, so every reward is ~0 and OPD learns nothing. "
        "Fix: pick a different (stronger) teacher."
    )


def identical_weights(a, b) -> bool:
    """True when two models have exactly the same parameters (names, shapes, dtypes and values)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape or pa[k].dtype != pb[k].dtype for k in pa):
        return False
    names = list(pa)
    probe = {names[0], names[len(names) // 2], names[-1]} if names else set()
    if not all(torch.equal(pa[k], pb[k]) for k in probe):
        return False
    return all(torch.equal(pa[k], pb[k]) for k in names if k not in probe)


def load_tokenizer(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, gguf_file: str | None = None
):
    """Load the tokenizer of a checkpoint (same sources as ``load_model``; GGUF reads its metadata)."""
    source, gguf_name, local = _resolve_source(name_or_path, gguf_file, what="tokenizer")
    kwargs: dict = dict(trust_remote_code=trust_remote_code)
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    if not local and _hub_offline():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        if local:
            raise
        raise FileNotFoundError(_not_found_message("tokenizer", name_or_path, err)) from err
    auto_map = getattr(tokenizer, "init_kwargs", {}).get("auto_map")
    if auto_map and not trust_remote_code:  # see _drop_unused_auto_map
        log.warning(
            "tokenizer %r: its tokenizer_config.json names custom code (auto_map: %s) that was NOT used: "
            "trust_remote_code is off, so it was loaded as the built-in %s. auto_map is left out of the "
            "tokenizer files this run saves.",
            os.fspath(name_or_path),
            auto_map,
            type(tokenizer).__name__,
        )
        del tokenizer.init_kwargs["auto_map"]
    return tokenizer


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, atomic: bool = True) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` as a checkpoint ``load_model`` (or plain
    ``from_pretrained``) reads back: ``model.safetensors``, ``config.json``, ``generation_config.json``, and
    the tokenizer files with its chat template. The one model saver: the training loop's final model,
    checkpoints' ``model/`` part and the lab zoo builder all call it.

    - The weights are saved as they are in memory (the training loop's float32 masters).
    - ``atomic=True``: everything is written into a temporary sibling ``.tmp-<name>-<pid>`` that is
      renamed onto ``out_dir`` only when complete (``os.replace`` of a directory is atomic on POSIX), so a
      crash leaves the previous ``out_dir`` intact, never a half-written one. An existing ``out_dir`` is
      replaced only if it is empty or holds a model (a ``config.json``); anything else is refused rather
      than deleted. ``atomic=False`` writes into ``out_dir`` directly (for a caller that already writes
      into its own temporary directory, as ``opd.checkpoint.save_checkpoint`` does).
    - ``auto_map`` (custom modelling code) never reaches the saved config or tokenizer files when the
      model was loaded with trust_remote_code off: ``load_model`` / ``load_tokenizer`` drop it on load.
    - A model that transformers still marks as GGUF-quantised (loaded with plain ``from_pretrained(...,
      gguf_file=...)``) cannot be saved by ``save_pretrained``; it is first copied into a fresh dense model
      built from its config without ``quantization_config``. Reloading the copy takes well under a
      second, against 10-40 s for dequantising the GGUF again.
    """
    out = Path(out_dir)
    if _is_quantized(model):
        model = _dense_copy(model)
    if not atomic:
        _write_model(model, tokenizer, out)
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise FileExistsError(
            f"save_model: {str(out)!r} exists and is not an empty directory or a saved model; it would be "
            "replaced. Fix: choose a new directory, or delete it first"
        )
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():  # left behind by a crash of this same pid number
        shutil.rmtree(tmp)
    _write_model(model, tokenizer, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_model(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _gguf_kwargs(gguf_name: str) -> dict:
    """Ask for dequantised dense weights. transformers >= 5.24 otherwise keeps GGUF blocks packed in
    ``GgufLinear`` modules whenever the ``kernels`` package is installed, and those are not trainable."""
    try:
        from transformers import GgufConfig  # version-dependent: not in every transformers 5.x
    except ImportError:  # older transformers 5.x always dequantises
        return {"gguf_file": gguf_name}
    return {"gguf_file": gguf_name, "quantization_config": GgufConfig(dequantize=True)}


def _is_quantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def _dense_copy(model):
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    dense = type(model)(config).to(dtype=model.dtype)
    try:
        dense.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"cannot save {type(model).__name__}: its weights are still packed in quantised blocks ({err}). "
            "Load it with opd.models.load_model, which dequantises GGUF weights, then save it."
        ) from err
    dense.generation_config = copy.deepcopy(model.generation_config)
    return dense


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_local(name: str) -> bool:
    """A string that can only mean a filesystem path, never a hub id ``name`` or ``org/name``."""
    windows_path = os.sep != "/" and os.sep in name
    drive = len(name) > 1 and name[1] == ":"
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or windows_path
        or drive
    )


def _resolve_source(
    name_or_path: str | os.PathLike, gguf_file: str | None, *, what: str
) -> tuple[str, str | None, bool]:
    """-> (directory or hub id, gguf file name or None, is_local)."""
    name = os.fspath(name_or_path)
    if name.lower().startswith(("http://", "https://")):
        raise ValueError(
            f"{what} {name!r} is a URL: a served teacher (opd serve-teacher, docs/serve.md) works as "
            "`opd train teacher=http://host:port` only; here give a local directory, .gguf file, hub id or lab:<name>"
        )
    lab = resolve_lab(name, kind="model")
    if isinstance(lab, LabModel):
        return _resolve_source(lab.require_built(), gguf_file, what=what)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{what} path {name!r} is a file but not a .gguf file: pass the checkpoint directory "
                "(config.json + *.safetensors) or a .gguf file"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"{what} path {name!r} is a .gguf file and gguf_file={gguf_file!r}: pass one")
        return str(path.parent), path.name, True
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"gguf_file={gguf_file!r} not found in {what} directory {name!r}")
            return str(path), gguf_file, True
        if not (path / "config.json").is_file() and what == "model":
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {ggufs}: pass gguf_file=<one of them>" if ggufs else ""
            raise FileNotFoundError(f"{what} directory {name!r} has no config.json{hint}")
        return str(path), None, True
    if _looks_local(name):
        raise FileNotFoundError(
            f"{what} path {name!r} not found (resolved to {str(path)!r}). Fix: check the path; a checkpoint "
            "is a directory with config.json + *.safetensors, or a .gguf file"
        )
    return name, gguf_file, False


def _not_found_message(what: str, name_or_path, err: Exception) -> str:
    reason = (
        "HF_HUB_OFFLINE is set and it is not in the local hub cache"
        if _hub_offline()
        else f"downloading it from the hub failed ({type(err).__name__}: {str(err).splitlines()[0]})"
    )
    return (
        f"{what} {str(name_or_path)!r} was not found: it is not a local directory or file, and {reason}. "
        "Fix: pass the path of a local checkpoint directory (config.json + *.safetensors) or a .gguf file; "
        "or, for a hub id, go online (unset HF_HUB_OFFLINE) or download it first with "
        f"`hf download {name_or_path}`."
    )


# --------------------------------------------------------------------------------------- compatibility


def check_compatibility(
    student_tokenizer,
    teacher_tokenizer,
    student_model=None,
    teacher_model=None,
    *,
    strict: bool = False,
) -> CompatReport:
    """Check that the teacher can score the student's token ids; return the shared ``vocab_limit``.

    Errors (``TokenizerMismatchError``): a token with different ids in the two tokenizers, or an id below
    ``vocab_limit`` that only one of them has; a model whose embedding / output table has fewer rows
    than its tokenizer has ids. ``vocab_limit`` = the smaller of the two tokenizers' id ranges (extra
    tokens at the end of one vocabulary are allowed, and warned about).
    Warnings: different EOS / PAD / BOS ids, different chat templates, different vocabulary sizes.
    ``strict=True`` turns warnings into errors.
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    s_size, t_size = tokenizer_vocab_size(student_tokenizer), tokenizer_vocab_size(teacher_tokenizer)
    vocab_limit = min(s_size, t_size)

    diffs = _vocab_differences(s_vocab, t_vocab, vocab_limit)
    if diffs:
        shown = "; ".join(_describe(tok, sid, tid) for tok, sid, tid in diffs[:5])
        raise TokenizerMismatchError(
            f"student and teacher tokenizers give {len(diffs)} token(s) different ids, e.g. {shown}. OPD "
            "has the teacher score the student's token ids, so the ids must mean the same strings. Fix: use a "
            "teacher from the student's tokenizer family (same vocabulary), or distil off-policy from text the "
            "teacher generated (SFT), which needs no shared vocabulary."
        )

    warnings: list[str] = []
    if s_size != t_size:
        bigger = "teacher" if t_size > s_size else "student"
        warnings.append(
            f"vocabulary sizes differ (student {s_size}, teacher {t_size}): the {bigger}'s extra ids "
            f">= {vocab_limit} are dropped from its logits (scoring uses vocab_limit={vocab_limit})."
        )
    warnings += trait_warnings(tokenizer_traits(student_tokenizer), tokenizer_traits(teacher_tokenizer))
    notes: list[str] = []
    for role, model, tok_size in (("student", student_model, s_size), ("teacher", teacher_model, t_size)):
        if model is not None:
            _check_table(role, model, tok_size)
            rows = _table_rows(model)
            if rows > vocab_limit:
                notes.append(
                    f"{role}'s embedding / output table has {rows} rows, more than the {vocab_limit} token ids "
                    f"the tokenizers share: ids 0-{vocab_limit - 1} are scored and sampled, rows "
                    f"{vocab_limit}-{rows - 1} are ignored (padding past the tokenizer; this is fine)."
                )
    if strict and warnings:
        raise TokenizerMismatchError("strict compatibility check failed: " + " ".join(warnings))
    return CompatReport(vocab_limit=vocab_limit, warnings=warnings, notes=notes)


def tokenizer_traits(tokenizer) -> dict[str, Any]:
    """What a tokenizer has beyond its vocabulary that student and teacher should share: the EOS / PAD /
    BOS tokens as ``[token, id]`` and the chat template. JSON-ready (a served teacher reports its own in
    ``/info``); compared by :func:`trait_warnings`."""
    traits: dict[str, Any] = {
        kind: [getattr(tokenizer, f"{kind}_token"), getattr(tokenizer, f"{kind}_token_id")]
        for kind in ("eos", "pad", "bos")
    }
    traits["chat_template"] = tokenizer.chat_template
    return traits


def trait_warnings(student: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    """The warnings of two tokenizers' :func:`tokenizer_traits` that differ (different EOS / PAD / BOS ids,
    different chat templates): the teacher can still score the student's ids, but rollouts stop and pad
    with the student's tokens and prompts are rendered once."""
    warnings: list[str] = []
    for kind in ("eos", "pad", "bos"):
        (s_tok, s_id), (t_tok, t_id) = student[kind], teacher[kind]
        if s_id != t_id:
            warnings.append(
                f"{kind.upper()} differs: student {s_tok!r} (id {s_id}), teacher {t_tok!r} (id {t_id}). Rollouts "
                "stop and pad with the student's tokens; check that the teacher's end-of-response token is among "
                "the stop ids (opd.rollout.stop_token_ids)."
            )
    s_tmpl, t_tmpl = student["chat_template"], teacher["chat_template"]
    if s_tmpl != t_tmpl:
        state = (
            "missing in the student" if s_tmpl is None else "missing in the teacher" if t_tmpl is None else ""
        )
        warnings.append(
            f"chat templates differ{' (' + state + ')' if state else ''}: prompts are rendered once and the "
            "teacher scores them as they are; a prompt format the teacher was not post-trained on lowers "
            "student/teacher overlap. Fix: render prompts with the teacher's template (docs/paper.md §4)."
        )
    return warnings


def _table_rows(model) -> int:
    out = model.get_output_embeddings()
    return int((out if out is not None else model.get_input_embeddings()).weight.shape[0])


def _vocab_differences(
    s_vocab: dict[str, int], t_vocab: dict[str, int], limit: int
) -> list[tuple[str, int | None, int | None]]:
    """(token, student id, teacher id) for every token that has an id below ``limit`` in either
    tokenizer and not the same id in both; ordered by the smaller id."""
    diffs = []
    for tok, sid in s_vocab.items():
        tid = t_vocab.get(tok)
        if sid != tid and (sid < limit or (tid is not None and tid < limit)):
            diffs.append((tok, sid, tid))
    for tok, tid in t_vocab.items():
        if tok not in s_vocab and tid < limit:
            diffs.append((tok, None, tid))
    return sorted(diffs, key=lambda d: min(i for i in d[1:] if i is not None))


def _describe(tok: str, sid: int | None, tid: int | None) -> str:
    s = f"student id {sid}" if sid is not None else "not in the student"
    t = f"teacher id {tid}" if tid is not None else "not in the teacher"
    return f"token {tok!r}: {s}, {t}"


def _check_table(role: str, model, tok_size: int) -> None:
    tables = {"input embedding": model.get_input_embeddings().weight.shape[0]}
    out = model.get_output_embeddings()
    if out is not None:
        tables["output (lm_head)"] = out.weight.shape[0]
    for name, rows in tables.items():
        if rows < tok_size:
            raise TokenizerMismatchError(
                f"{role} model's {name} table has {rows} rows but its tokenizer has {tok_size} ids: ids "
                f">= {rows} cannot be scored. Fix: load the tokenizer that belongs to this checkpoint."
            )


# ----------------------------------------------------------------------------------------- layer drop


def drop_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers ``keep`` (strictly increasing indices).

    The copy shares the tokenizer and every non-layer weight's values (copied, not tied to the
    original); ``config.num_hidden_layers`` (and ``layer_types`` when present) and each attention
    module's ``layer_idx`` (its KV-cache slot) are renumbered 0..len(keep)-1. Useful to make a
    same-tokenizer student from a real checkpoint. Dropped layers are never copied.
    """
    parent, attr = _find_layers(model)
    layers = getattr(parent, attr)
    n_layers = len(layers)
    keep = list(keep)
    if not keep or any(not isinstance(i, int) for i in keep):
        raise ValueError(f"keep={keep!r}: expected a non-empty list of layer indices")
    if any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= n_layers:
        raise ValueError(f"keep={keep}: expected strictly increasing indices in [0, {n_layers})")

    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    try:
        small = copy.deepcopy(model)
    finally:
        setattr(parent, attr, layers)

    small_parent, _ = _find_layers(small, expected=len(keep))
    for new_idx, layer in enumerate(getattr(small_parent, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = small.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return small


def _find_layers(model, expected: int | None = None) -> tuple[torch.nn.Module, str]:
    """(module, attribute) of the decoder-layer ``ModuleList`` (``model.model.layers`` for Llama, Qwen,
    Mistral, Gemma; otherwise the ModuleList with ``config.num_hidden_layers`` entries)."""
    n = expected if expected is not None else getattr(model.config, "num_hidden_layers", None)
    base = getattr(model, "model", None)
    if isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
        return base, "layers"
    for module in model.modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                return module, attr
    raise ValueError(
        f"drop_layers: no decoder-layer ModuleList with {n} entries found in {type(model).__name__}; "
        "only decoder-only models with a list of layers are supported"
    )
