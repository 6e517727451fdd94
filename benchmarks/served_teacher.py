"""Served-teacher overhead: the teacher's scoring of a rollout batch through ``opd serve-teacher`` on
localhost vs the same scoring in the training process, per scored (response) token.

Both sides run the very call the training loop makes (:func:`opd.scoring.score_teacher`, one call per
micro-batch, log-probs at the student's top-K ids + the teacher's own top-K + entropy, K =
``--top-k``, the default ``metrics_top_k``). The local side holds a :class:`opd.scoring.PolicyScorer`
of the teacher; the served side a :class:`opd.remote.RemoteTeacher` talking to ``opd serve-teacher`` —
started here as a subprocess on 127.0.0.1 with the same model, dtype and thread count, so the numbers
include process-to-process HTTP, the safetensors encoding both ways and the server's request checks,
but no network: a real network adds its round trip and bytes / bandwidth (both printed).

The batch: ``--batch`` rows of ``--prompt`` random prompt tokens + ``--response`` random response tokens
(scoring cost does not depend on the token values), ``--micro-batch`` rows per call. Each figure is the
median of ``--repeats`` timed passes over the batch after one untimed warm-up pass; the served scores are
checked against the local ones (max |Δ| printed). Local and server share this machine's cores, one at a
time (the client waits while the server scores). The server reports its own scoring time per request
(``X-OPD-Score-Seconds``), so the served time splits into the model's scoring and the rest — HTTP,
encoding and decoding, request checks: the transport overhead, which does not depend on how fast the
two processes happen to compute on a shared machine.

Usage: python benchmarks/served_teacher.py [--model lab:teacher-b-plus] [--dtype float32] [--batch 16]
       [--micro-batch 8] [--prompt 32] [--response 96] [--top-k 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import time

# OpenMP threads that spin after each parallel region would steal the shared cores from the other
# process (client or server) for a while after every call; passive waiting keeps the two apart.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.remote import RemoteTeacher  # noqa: E402
from opd.remote.protocol import encode_request  # noqa: E402
from opd.rollout import RolloutBatch, model_vocab_limit  # noqa: E402
from opd.scoring import PolicyScorer, score_teacher  # noqa: E402


def make_batch(B: int, P: int, R: int, V: int, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    resp = torch.zeros(B, P + R)
    resp[:, P:] = 1
    return RolloutBatch(
        input_ids_B_T=ids,
        attention_mask_B_T=attn,
        response_mask_B_T=resp,
        prompt_len=P,
        truncated_B=torch.zeros(B, dtype=torch.bool),
        prompt_index_B=torch.arange(B),
    )


def one_pass(teacher, batch: RolloutBatch, given_B_T_K: torch.Tensor, mb: int, k: int):
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, batch.input_ids_B_T.shape[0], mb):
            sl = slice(lo, lo + mb)
            outs.append(score_teacher(teacher, batch.select(sl), given_B_T_K[sl], k))
    return time.perf_counter() - t0, outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPD_TEACHER_TOKEN": ""}
    cmd = [sys.executable, "-m", "opd.cli", "serve-teacher", "--model", model, "--port", str(port)]
    cmd += ["--dtype", dtype, "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lab:teacher-b-plus")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=96)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype).eval()
    V = model_vocab_limit(model, tok)
    batch = make_batch(args.batch, args.prompt, args.response, V)
    given = torch.randint(
        0, V, (*batch.input_ids_B_T.shape, args.top_k), generator=torch.Generator().manual_seed(1)
    )
    given = given * batch.response_mask_B_T.long()[..., None]
    n_tokens = int(batch.response_mask_B_T.sum())
    local = PolicyScorer(model, vocab_limit=V)

    proc, url = start_server(args.model, args.dtype, args.threads)
    try:
        deadline = time.monotonic() + 300
        client = None
        logging.getLogger("opd").setLevel(logging.ERROR)  # the refused connections while it starts
        while client is None:
            try:
                client = RemoteTeacher(url, tok, vocab_limit=V, retries=0, timeout=600)
            except ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the server did not start:\n{proc.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        times = {"local": [], "served": [], "server": []}
        outs = {}
        for teacher in (local, client):
            one_pass(teacher, batch, given, args.micro_batch, args.top_k)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            for name, teacher in (("local", local), ("served", client)):
                before = client.server_seconds
                sec, outs[name] = one_pass(teacher, batch, given, args.micro_batch, args.top_k)
                times[name].append(sec)
                if name == "served":
                    times["server"].append(client.server_seconds - before)
        diff = max(
            float((getattr(a, f) - getattr(b, f)).abs().max())
            for a, b in zip(outs["local"], outs["served"])
            for f in ("token_logp_B_T", "topk_logp_B_T_K", "given_logp_B_T_K", "entropy_B_T")
        )
        mb = batch.select(slice(0, args.micro_batch))
        req = encode_request(
            mb.input_ids_B_T,
            mb.attention_mask_B_T,
            mb.response_mask_B_T,
            given[: args.micro_batch],
            temperature=1.0,
            top_k=args.top_k,
            entropy=True,
            vocab_limit=V,
            chunk_size=256,
        )
        reply = client._request(
            "POST", "/score", content=req, headers={"Content-Type": "application/octet-stream"}
        )
        mb_tokens = int(mb.response_mask_B_T.sum())
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    t_local, t_served = statistics.median(times["local"]), statistics.median(times["served"])
    transport = statistics.median(a - b for a, b in zip(times["served"], times["server"]))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model} ({params / 1e6:.2f}M parameters, V={V}, {args.dtype}), batch {args.batch} x "
        f"({args.prompt} prompt + {args.response} response), micro-batch {args.micro_batch}, top-k {args.top_k}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'':>32} {'s/batch':>9} {'us/token':>9}")
    rows = (
        ("local (in this process)", t_local),
        ("served (client wall clock)", t_served),
        ("  of which the server's scoring", statistics.median(times["server"])),
        ("  of which transport + coding", transport),
    )
    for name, t in rows:
        print(f"{name:>32} {t:9.4f} {1e6 * t / n_tokens:9.1f}")
    print(
        f"served/local {t_served / t_local:.2f}x; transport + coding {1e6 * transport / n_tokens:.1f} us per scored "
        f"token ({transport / t_served:.0%} of the served time); wire per scored token: request "
        f"{len(req) / mb_tokens:.0f} B, reply {len(reply.content) / mb_tokens:.0f} B; max |served - local| = {diff:.2e}"
    )


if __name__ == "__main__":
    main()
