"""The training side of a served teacher: :class:`RemoteTeacher` scores like a local teacher's
:class:`opd.scoring.PolicyScorer`, over HTTP (``teacher=http://host:port`` in ``opd train``).

It is called exactly as the local scorer is — ``teacher(input_ids_B_T, attention_mask_B_T,
response_mask_B_T, given_ids_B_T_K, top_k=..., entropy=...) -> ScoreOutput`` — so
:func:`opd.scoring.score_teacher` (and with it the teacher-prompt re-layout, ``score_pair`` and the fused
update) does not know which one it holds. One request per micro-batch; the server computes the same
:func:`opd.scoring.score` at the client's temperature, vocab limit and chunk size, so the rewards equal
the local ones to float32 round-off of the teacher's own forward (tests/test_serve.py).

Failures: a connection error, a timeout or a 5xx/503 is retried ``retries`` times with exponential
backoff (``backoff`` · 2^attempt seconds), then :class:`TeacherServerError` (an ``OSError``) names the URL;
401 (token), 409 (tokenizer fingerprint), 413 (size) and 400 are not retried and raise at once with the
server's sentence. The bearer token comes from the ``OPD_TEACHER_TOKEN`` environment variable (never a
config key: configs are written to the run directory).

What it leaves out: the full-vocabulary objective (it needs the teacher's logits in the student's
backward; use objective=topk or sampled), pipelining requests with the student's work, and sharding a
batch over several servers.
"""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace
from typing import Any

import torch

from opd.models import TokenizerMismatchError, tokenizer_traits, trait_warnings
from opd.remote.protocol import (
    FINGERPRINT_HEADER,
    MEDIA_TYPE,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    SECONDS_HEADER,
    decode_response,
    encode_request,
    tokenizer_fingerprint,
)
from opd.scoring import ScoreOutput

log = logging.getLogger("opd")

TOKEN_ENV = "OPD_TEACHER_TOKEN"


def is_remote(teacher: str) -> bool:
    """Whether a ``teacher`` value names a served teacher (``http://`` or ``https://``)."""
    return isinstance(teacher, str) and teacher.lower().startswith(("http://", "https://"))


class TeacherServerError(ConnectionError):
    """The teacher server is unreachable or failed after the retries (the message names the URL)."""


class RemoteTeacher:
    """A served teacher with :class:`opd.scoring.PolicyScorer`'s scoring call (module docstring).

    ``tokenizer``: the student's (its fingerprint goes with every request and is checked against the
    server's on construction). ``temperature`` / ``chunk_size`` / ``vocab_limit``: as the local teacher
    scorer's. ``timeout``: seconds per HTTP request; ``retries``: further tries after a failed one.
    Construction calls ``/info`` (with the same retries), so a wrong URL, token, protocol or vocabulary
    fails before any training work; a different EOS / PAD / BOS or chat template is in ``warnings``. ``info`` holds the server's answer; ``config`` its context length
    (as a model config would, for :func:`opd.models.prompt_token_cap`).
    """

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        *,
        temperature: float = 1.0,
        chunk_size: int = 256,
        vocab_limit: int | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        try:
            import httpx
        except ImportError:
            raise ImportError(
                f"teacher={url}: a served teacher needs httpx: pip install 'opd[serve]'"
            ) from None
        self._httpx = httpx
        self.url = url.rstrip("/")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {FINGERPRINT_HEADER: self.fingerprint, PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.info = self._request("GET", "/info").json()
        if self.info.get("protocol_version") != PROTOCOL_VERSION:
            raise TeacherServerError(
                f"teacher={self.url} speaks protocol {self.info.get('protocol_version')}, this opd speaks "
                f"{PROTOCOL_VERSION}: install the same opd version on both sides"
            )
        if self.info["tokenizer_fingerprint"] != self.fingerprint:
            raise TokenizerMismatchError(
                f"teacher={self.url} ({self.info.get('model')}) has tokenizer {self.info['tokenizer_fingerprint']}, "
                f"the student's is {self.fingerprint}: the teacher would score the student's ids as other strings. "
                "Fix: serve a teacher of the student's tokenizer (same vocabulary)"
            )
        self.warnings = trait_warnings(tokenizer_traits(tokenizer), self.info["tokenizer_traits"])
        """What differs between the student's tokenizer and the teacher's beyond the vocabulary (EOS / PAD /
        BOS, chat template): warnings, as with a local teacher (:func:`opd.models.check_compatibility`)."""
        self.vocab_limit = int(vocab_limit) if vocab_limit is not None else int(self.info["vocab_size"])
        self.config = SimpleNamespace(max_position_embeddings=self.info.get("context_length"))
        self.num_parameters = int(self.info.get("parameters", 0))
        self.server_seconds = 0.0
        """Sum of the server's own scoring time over this client's requests (``X-OPD-Score-Seconds``)."""

    def __repr__(self) -> str:
        return f"RemoteTeacher({self.url!r}, model={self.info.get('model')!r})"

    def close(self) -> None:
        self._client.close()

    def __call__(
        self,
        input_ids_B_T: torch.Tensor,
        attention_mask_B_T: torch.Tensor,
        response_mask_B_T: torch.Tensor,
        given_ids_B_T_K: torch.Tensor | None = None,
        *,
        top_k: int = 0,
        entropy: bool = False,
    ) -> ScoreOutput:
        """The teacher's :class:`ScoreOutput` of one micro-batch, on ``input_ids_B_T``'s device."""
        body = encode_request(
            input_ids_B_T,
            attention_mask_B_T,
            response_mask_B_T,
            given_ids_B_T_K,
            temperature=self.temperature,
            top_k=top_k,
            entropy=entropy,
            vocab_limit=self.vocab_limit,
            chunk_size=self.chunk_size,
        )
        reply = self._request("POST", "/score", content=body, headers={"Content-Type": MEDIA_TYPE})
        self.server_seconds += float(reply.headers.get(SECONDS_HEADER, 0.0))
        return decode_response(reply.content, response_mask_B_T, input_ids_B_T.device)

    def _request(self, method: str, path: str, **kw: Any):
        """One HTTP call with bounded retries (module docstring); raises with a one-line message."""
        httpx = self._httpx
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, path, **kw)
            except httpx.TransportError as e:  # refused, reset, timed out, DNS
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                log.warning(
                    "teacher %s%s: %s (try %d of %d)", self.url, path, last, attempt + 1, self.retries + 1
                )
                continue
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}: {_detail(r)}"
                log.warning(
                    "teacher %s%s: %s (try %d of %d)", self.url, path, last, attempt + 1, self.retries + 1
                )
                continue
            if r.status_code == 409:
                raise TokenizerMismatchError(f"teacher={self.url}: {_detail(r)}")
            if r.status_code == 401:
                raise PermissionError(f"teacher={self.url}: {_detail(r)}")
            if r.status_code >= 400:
                raise ValueError(f"teacher={self.url}{path}: HTTP {r.status_code}: {_detail(r)}")
            return r
        raise TeacherServerError(
            f"teacher={self.url}: no answer from the teacher server after {self.retries + 1} tries ({last}). "
            "Fix: check that `opd serve-teacher` is running and reachable at that address"
        )


def _detail(r) -> str:
    try:
        return str(r.json().get("detail", r.text))
    except ValueError:
        return r.text[:200]
