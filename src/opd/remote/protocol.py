"""The wire format between ``opd serve-teacher`` and :class:`opd.remote.client.RemoteTeacher`.

Both directions are **safetensors** bytes (``application/octet-stream``): a JSON header and raw little-endian
tensors, read without executing anything (no pickle). Scalars travel as 0-d tensors in the same body.

``POST /score`` request (one micro-batch, the teacher's layout):

- ``input_ids`` int32 (B, T), ``attention_mask`` uint8 (B, T), ``response_mask`` uint8 (B, T) — the
  :class:`opd.rollout.RolloutBatch` layout (left-padded prompts, responses from column ``prompt_len``);
- ``given_ids`` int32 (N, K), optional: the ids to score at each response position (the student's top-K),
  N = ``response_mask.sum()`` positions in row-major order — response positions only;
- ``temperature`` float64 (), ``top_k`` int64 () (0 = no top-k), ``entropy`` uint8 (),
  ``vocab_limit`` int64 () (logit columns to use; the client's, so both sides compute the same
  log-softmax), ``chunk_size`` int64 () (positions per head chunk).

Headers: ``X-OPD-Tokenizer`` = :func:`tokenizer_fingerprint` of the client's tokenizer (409 when it is
not the server's), ``X-OPD-Protocol`` = :data:`PROTOCOL_VERSION`, and ``Authorization: Bearer <token>``
when the server has a token (401 otherwise).

Response: float32 ``token_logp`` (N,), ``entropy`` (N,), ``given_logp`` (N, K), ``topk_logp`` (N, k) and
int32 ``topk_ids`` (N, k), each present when asked for — per response position only, so a request of B×T
tokens returns O(N·K) numbers, never a B×T×V tensor. :func:`decode_response` scatters them back into the
:class:`opd.scoring.ScoreOutput` layout (zeros off the response mask, as :func:`opd.scoring.score` gives).

What it leaves out: compression beyond dropping non-response positions (log-probs are incompressible
float32), streaming, several micro-batches per request (the client sends one request per micro-batch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opd.scoring import ScoreOutput

PROTOCOL_VERSION = 2
"""2: the tokenizer fingerprint is of the vocabulary only (special tokens travel in ``/info``), and the
request has no ``prompt_len`` (the response mask says where responses are)."""
FINGERPRINT_HEADER = "X-OPD-Tokenizer"
PROTOCOL_HEADER = "X-OPD-Protocol"
SECONDS_HEADER = "X-OPD-Score-Seconds"
MEDIA_TYPE = "application/octet-stream"
MAX_TOP_K = 1024
"""The largest ``top_k`` / given-ids width a server answers (the reply is N × K numbers)."""


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol (the message says what and the fix)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """``sha256:<hex>`` of the tokenizer's vocabulary (every token string and id, added tokens included).
    Two tokenizers with the same fingerprint map every id to the same string, so a teacher can score the
    other's token ids. Special tokens and chat templates are not part of it: as with a local teacher
    (:func:`opd.models.check_compatibility`), a different EOS / PAD / BOS or template is a warning, which
    the client gives from the server's ``/info`` (:func:`opd.models.tokenizer_traits`)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps({"vocab": vocab}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class ScoreRequest:
    """A decoded ``/score`` request; ``given_ids_B_T_K`` is scattered back to the (B, T, K) layout."""

    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor
    response_mask_B_T: torch.Tensor
    given_ids_B_T_K: torch.Tensor | None
    temperature: float
    top_k: int
    entropy: bool
    vocab_limit: int
    chunk_size: int


def encode_request(
    input_ids_B_T: torch.Tensor,
    attention_mask_B_T: torch.Tensor,
    response_mask_B_T: torch.Tensor,
    given_ids_B_T_K: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int,
    entropy: bool,
    vocab_limit: int,
    chunk_size: int,
) -> bytes:
    """The request body for one micro-batch (module docstring); ``given_ids`` only at response positions."""
    resp = response_mask_B_T.bool().cpu()
    tensors = {
        "input_ids": input_ids_B_T.detach().cpu().to(torch.int32).contiguous(),
        "attention_mask": attention_mask_B_T.detach().cpu().to(torch.uint8).contiguous(),
        "response_mask": resp.to(torch.uint8).contiguous(),
        "temperature": torch.tensor(float(temperature), dtype=torch.float64),
        "top_k": torch.tensor(int(top_k), dtype=torch.int64),
        "entropy": torch.tensor(int(bool(entropy)), dtype=torch.uint8),
        "vocab_limit": torch.tensor(int(vocab_limit), dtype=torch.int64),
        "chunk_size": torch.tensor(int(chunk_size), dtype=torch.int64),
    }
    if given_ids_B_T_K is not None:
        tensors["given_ids"] = given_ids_B_T_K.detach().cpu()[resp].to(torch.int32).contiguous()
    return st_save(tensors)


def _load(body: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ProtocolError(f"{what} is not a safetensors body ({e}); send opd's protocol") from None


def decode_request(body: bytes, *, vocab_size: int, max_tokens: int) -> ScoreRequest:
    """Parse and check a request body against a server with ``vocab_size`` logit columns and a limit of
    ``max_tokens`` B×T tokens per request; every violation is a :class:`ProtocolError` naming the field."""
    t = _load(body, "the request")
    need = {
        "input_ids": (2, (torch.int32, torch.int64)),
        "attention_mask": (2, (torch.uint8, torch.bool)),
        "response_mask": (2, (torch.uint8, torch.bool)),
        "temperature": (0, (torch.float64,)),
        "top_k": (0, (torch.int64,)),
        "entropy": (0, (torch.uint8,)),
        "vocab_limit": (0, (torch.int64,)),
        "chunk_size": (0, (torch.int64,)),
    }
    for name, (ndim, dtypes) in need.items():
        if name not in t:
            raise ProtocolError(f"request: field {name!r} is missing")
        if t[name].ndim != ndim or t[name].dtype not in dtypes:
            raise ProtocolError(
                f"request: field {name!r} has shape {tuple(t[name].shape)} and dtype {t[name].dtype}; expected "
                f"{ndim} dims of {' or '.join(str(d) for d in dtypes)}"
            )
    ids, attn, resp = t["input_ids"], t["attention_mask"], t["response_mask"]
    B, T = ids.shape
    if attn.shape != (B, T) or resp.shape != (B, T):
        raise ProtocolError(
            f"request: input_ids {tuple(ids.shape)}, attention_mask {tuple(attn.shape)} and response_mask "
            f"{tuple(resp.shape)} must have the same shape"
        )
    if max_tokens < B * T:
        raise ProtocolError(f"request: {B}x{T} = {B * T} tokens; this server takes at most {max_tokens}")
    vocab_limit, top_k, chunk = int(t["vocab_limit"]), int(t["top_k"]), int(t["chunk_size"])
    temperature = float(t["temperature"])
    if not 1 <= vocab_limit <= vocab_size:
        raise ProtocolError(
            f"request: vocab_limit={vocab_limit}, the teacher has {vocab_size} logit columns; the tokenizers "
            "match, so the client's vocab_limit must be within the teacher's"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_limit):
        raise ProtocolError(f"request: input_ids outside [0, {vocab_limit})")
    if not 0 <= top_k <= min(MAX_TOP_K, vocab_limit):
        raise ProtocolError(f"request: top_k={top_k}: must be in [0, {min(MAX_TOP_K, vocab_limit)}]")
    if not 1 <= chunk <= 1 << 16:
        raise ProtocolError(f"request: chunk_size={chunk}: must be in [1, 65536]")
    if not (temperature > 0 and temperature < float("inf")):
        raise ProtocolError(f"request: temperature={temperature}: must be a finite number > 0")
    resp_b = resp.bool()
    if bool((resp_b & ~attn.bool()).any()):
        raise ProtocolError("request: response_mask is 1 where attention_mask is 0")
    given = None
    if "given_ids" in t:
        g = t["given_ids"]
        N = int(resp_b.sum())
        if g.ndim != 2 or g.shape[0] != N or g.dtype not in (torch.int32, torch.int64):
            raise ProtocolError(
                f"request: given_ids has shape {tuple(g.shape)} and dtype {g.dtype}; expected int32 "
                f"({N}, K): one row per response position"
            )
        if not 1 <= g.shape[1] <= MAX_TOP_K:
            raise ProtocolError(f"request: given_ids has K={g.shape[1]} columns; must be in [1, {MAX_TOP_K}]")
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= vocab_limit):
            raise ProtocolError(f"request: given_ids outside [0, {vocab_limit})")
        given = torch.zeros((B, T, g.shape[1]), dtype=torch.long)
        given[resp_b] = g.long()
    return ScoreRequest(
        ids.long(),
        attn.long(),
        resp.long(),
        given,
        temperature=temperature,
        top_k=top_k,
        entropy=bool(int(t["entropy"])),
        vocab_limit=vocab_limit,
        chunk_size=chunk,
    )


_FIELDS = {  # ScoreOutput field -> (wire name, wire dtype)
    "token_logp_B_T": ("token_logp", torch.float32),
    "entropy_B_T": ("entropy", torch.float32),
    "given_logp_B_T_K": ("given_logp", torch.float32),
    "topk_logp_B_T_K": ("topk_logp", torch.float32),
    "topk_ids_B_T_K": ("topk_ids", torch.int32),
}


def encode_response(out: ScoreOutput, response_mask_B_T: torch.Tensor) -> bytes:
    """The response body: every present field of ``out`` at the response positions only (N rows)."""
    resp = response_mask_B_T.bool().cpu()
    tensors = {}
    for field, (name, dtype) in _FIELDS.items():
        x = getattr(out, field)
        if x is not None:
            tensors[name] = x.detach().cpu()[resp].to(dtype).contiguous()
    return st_save(tensors)


def decode_response(body: bytes, response_mask_B_T: torch.Tensor, device: torch.device | str) -> ScoreOutput:
    """The :class:`ScoreOutput` of a response body, in the request's (B, T) layout on ``device``: float32
    log-probs / entropy, int64 ids, zeros off the response mask (as :func:`opd.scoring.score` returns)."""
    t = _load(body, "the teacher server's reply")
    resp = response_mask_B_T.bool().cpu()
    N = int(resp.sum())
    fields = {}
    for field, (name, dtype) in _FIELDS.items():
        if name not in t:
            fields[field] = None
            continue
        x = t[name]
        if x.shape[0] != N or x.dtype != dtype:
            raise ProtocolError(
                f"the teacher server's reply: {name} has shape {tuple(x.shape)} / {x.dtype} for {N} response "
                "positions; client and server speak different protocol versions"
            )
        full = torch.zeros((*resp.shape, *x.shape[1:]), dtype=torch.long if dtype == torch.int32 else dtype)
        full[resp] = x.to(full.dtype)
        fields[field] = full.to(device)
    if fields["token_logp_B_T"] is None:
        raise ProtocolError("the teacher server's reply has no token_logp")
    return ScoreOutput(**fields)
