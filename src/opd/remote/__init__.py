"""A teacher on another machine: ``opd serve-teacher`` (:mod:`opd.remote.server`) scores token-id batches
over HTTP for ``opd train teacher=http://host:port`` (:class:`opd.remote.client.RemoteTeacher`), in the
wire format of :mod:`opd.remote.protocol`. FastAPI, uvicorn and httpx are the optional extra
``opd[serve]``; this package imports none of them at import time. docs/serve.md has both set-ups.
"""

from opd.remote.client import RemoteTeacher, TeacherServerError, is_remote
from opd.remote.protocol import PROTOCOL_VERSION, tokenizer_fingerprint

__all__ = ["PROTOCOL_VERSION", "RemoteTeacher", "TeacherServerError", "is_remote", "tokenizer_fingerprint"]
