"""``opd serve-teacher``: a teacher model behind HTTP, scoring token-id batches for OPD training elsewhere.

:class:`TeacherService` is the scoring itself, framework-free (load once, :meth:`TeacherService.score`
bytes → bytes, the same :func:`opd.scoring.score` the local path calls); :func:`create_app` puts it
behind FastAPI and :func:`serve` runs that with uvicorn. FastAPI and uvicorn are the optional extra
``opd[serve]``, imported only here.

Endpoints: ``GET /info`` (JSON: model, vocab size, tokenizer fingerprint, protocol version, dtype,
device, parameter count, context length, request limits) and ``POST /score`` (the wire format of
:mod:`opd.remote.protocol`). Checks, in this order, each a JSON ``{"detail": ...}`` with one sentence:

- 401 without ``Authorization: Bearer <token>`` when the server has a token (compared in constant time);
- 426 when the client's ``X-OPD-Protocol`` differs from the server's;
- 409 when the client's ``X-OPD-Tokenizer`` fingerprint is not the server's tokenizer's: the ids would
  mean other strings, and the teacher would score garbage without any error;
- 413 when the body exceeds ``--max-request-mb`` (the declared length is checked before anything is
  read, and the read stops at the limit);
- 400 for a body that breaks the protocol (shapes, dtypes, id ranges).

A scoring reply carries ``X-OPD-Score-Seconds``: the model's own scoring time, so a client can tell
compute from transport (``benchmarks/served_teacher.py``).

Scoring runs one request at a time (a lock around the model), in a worker thread, under
``torch.no_grad()``. Security: bind to 127.0.0.1 by default; use a token (``--token`` or the
``OPD_TEACHER_TOKEN`` environment variable, which keeps it out of the process list) and a TLS-terminating
proxy on any network you do not trust; the server never unpickles anything (safetensors bodies) and
loads the model with ``trust_remote_code`` off.
"""

import hmac
import logging
import threading
import time
from typing import Any

import torch

from opd.models import context_length, load_model, load_tokenizer, tokenizer_traits
from opd.remote.protocol import (
    FINGERPRINT_HEADER,
    MEDIA_TYPE,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    SECONDS_HEADER,
    decode_request,
    encode_response,
    tokenizer_fingerprint,
)
from opd.rollout import model_vocab_limit
from opd.scoring import score

log = logging.getLogger("opd")

SERVE_EXTRA_HINT = "pip install 'opd[serve]'"


class TeacherService:
    """One teacher model and its tokenizer, scoring :mod:`opd.remote.protocol` requests.

    ``max_request_bytes`` bounds a request body; ``max_tokens`` the B×T tokens of one request (the
    activations the server holds scale with it)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str = "",
        max_request_bytes: int = 64 << 20,
        max_tokens: int = 1 << 20,
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_request_bytes = int(max_request_bytes)
        self.max_tokens = int(max_tokens)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.vocab_size = model_vocab_limit(model, tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, *, dtype: str = "float32", device: str = "auto", **kw: Any) -> "TeacherService":
        """Load ``model`` (any source :func:`opd.models.load_model` takes) in ``dtype`` on ``device``."""
        from opd.runtime import resolve_device

        dev = resolve_device(device, "--device")
        tokenizer = load_tokenizer(model)
        return cls(load_model(model, dtype=dtype, device=dev), tokenizer, name=model, **kw)

    def info(self) -> dict[str, Any]:
        param = next(self.model.parameters())
        return {
            "model": self.name,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.fingerprint,
            "tokenizer_traits": tokenizer_traits(self.tokenizer),
            "protocol_version": PROTOCOL_VERSION,
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "context_length": context_length(self.model),
            "max_request_bytes": self.max_request_bytes,
            "max_tokens": self.max_tokens,
        }

    def score(self, body: bytes) -> tuple[bytes, float]:
        """One request body → its response body and the seconds the model's scoring took (the
        ``X-OPD-Score-Seconds`` header; raises :class:`opd.remote.protocol.ProtocolError`)."""
        req = decode_request(body, vocab_size=self.vocab_size, max_tokens=self.max_tokens)
        dev = next(self.model.parameters()).device
        with self._lock, torch.no_grad():
            t0 = time.perf_counter()
            out = score(
                self.model,
                req.input_ids_B_T.to(dev),
                req.attention_mask_B_T.to(dev),
                req.response_mask_B_T.to(dev),
                temperature=req.temperature,
                top_k=req.top_k,
                given_ids_B_T_K=None if req.given_ids_B_T_K is None else req.given_ids_B_T_K.to(dev),
                entropy=req.entropy,
                chunk_size=req.chunk_size,
                vocab_limit=req.vocab_limit,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
        return encode_response(out, req.response_mask_B_T), seconds


def _require_fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise ImportError(f"opd serve-teacher needs FastAPI and uvicorn: {SERVE_EXTRA_HINT}") from None
    return fastapi, uvicorn


def create_app(service: TeacherService, *, token: str | None = None):
    """The FastAPI application around ``service`` (module docstring for the endpoints and checks)."""
    fastapi, _ = _require_fastapi()
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    from opd.remote.protocol import ProtocolError

    app = fastapi.FastAPI(title="opd teacher", version=str(PROTOCOL_VERSION))
    expected = f"Bearer {token}".encode() if token else None

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    def authorized(request) -> bool:
        if expected is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    unauthorized = (
        "missing or wrong bearer token: set OPD_TEACHER_TOKEN on the training side to the server's --token"
    )

    @app.get("/info")
    async def info(request: Request):
        if not authorized(request):
            return error(401, unauthorized)
        return service.info()

    @app.post("/score")
    async def score_endpoint(request: Request):
        if not authorized(request):
            return error(401, unauthorized)
        version = request.headers.get(PROTOCOL_HEADER, "")
        if version != str(PROTOCOL_VERSION):
            return error(
                426,
                f"protocol version {version or 'missing'}, this server speaks {PROTOCOL_VERSION}: install the "
                "same opd version on both sides",
            )
        fingerprint = request.headers.get(FINGERPRINT_HEADER, "")
        if fingerprint != service.fingerprint:
            return error(
                409,
                f"tokenizer fingerprint mismatch: the client's is {fingerprint or 'missing'}, this teacher's "
                f"({service.name}) is {service.fingerprint}: the student's token ids would mean other strings "
                "to this teacher. Fix: a student and teacher of the same tokenizer (same vocabulary)",
            )
        limit = service.max_request_bytes
        too_big = (
            f"request body over this server's limit of {limit} bytes (--max-request-mb): lower "
            "micro_batch_size on the training side, or raise --max-request-mb"
        )
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return error(413, too_big)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return error(413, too_big)
        try:
            reply, seconds = await run_in_threadpool(service.score, bytes(body))
        except ProtocolError as e:
            return error(400, str(e))
        return Response(content=reply, media_type=MEDIA_TYPE, headers={SECONDS_HEADER: f"{seconds:.6f}"})

    return app


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    max_request_mb: float = 64.0,
    log_level: str = "info",
) -> None:
    """Load ``model`` and serve it until interrupted (``opd serve-teacher``)."""
    _, uvicorn = _require_fastapi()
    service = TeacherService.load(
        model, dtype=dtype, device=device, max_request_bytes=int(max_request_mb * (1 << 20))
    )
    info = service.info()
    log.info(
        "serving teacher %s (%s on %s, %d parameters, tokenizer %s) on http://%s:%d%s",
        model,
        info["dtype"],
        info["device"],
        info["parameters"],
        service.fingerprint,
        host,
        port,
        " with a bearer token" if token else " WITHOUT a token",
    )
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who reaches this port can use the teacher", host)
    uvicorn.run(create_app(service, token=token), host=host, port=port, log_level=log_level)
