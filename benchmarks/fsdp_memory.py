"""What each process holds of the student under ``fsdp=true``, against a full copy (data parallel).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py             # CPU, gloo
    torchrun --standalone --nproc_per_node 4 benchmarks/fsdp_memory.py --layers 8   # more processes

A random Qwen2 (built from a config; ``--hidden``, ``--layers``, ``--vocab``) is sharded the way
``opd train fsdp=true`` shards it (:func:`opd.fsdp.shard_student`); one scored micro-batch is
backpropagated through :class:`opd.fsdp.ShardedScorer` and AdamW takes a step, so gradients and both
AdamW moments exist. Rank 0 prints, per part, the bytes of the tensors this process holds (the local
shards of the DTensors) beside the bytes of a full copy, and their ratio — the ``16·N_s / world_size``
of docs/scaling.md's memory model. Tensor bytes are exact; transients (the all-gathered layer during its
forward / backward, activations) are not counted here.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd.fsdp import ShardedScorer, reshard_before_steps, shard_student


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is its global one


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    shard_student(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reshard_before_steps(model, opt)
    scorer = ShardedScorer(model, chunk_size=64)
    ids = torch.randint(0, a.vocab, (2, 32), generator=torch.Generator().manual_seed(rank))
    resp = torch.zeros_like(ids)
    resp[:, 16:] = 1
    out = scorer(ids, torch.ones_like(ids), resp, top_k=4)
    (out.token_logp_B_T * resp).sum().backward()
    opt.step()
    params = list(model.parameters())
    state = [t for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    rows = [
        ("weights (float32 masters)", params),
        ("gradients (float32)", [p.grad for p in params]),
        ("AdamW exp_avg + exp_avg_sq", state),
    ]
    mine = [sum(local_bytes(t) for t in ts) for _, ts in rows]
    full = [sum(full_bytes(t) for t in ts) for _, ts in rows]
    largest = torch.tensor(mine, dtype=torch.float64)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # the process holding the most (shards can be uneven)
    if rank == 0:
        mib = 2**20
        print(
            f"torch {torch.__version__}, {world} processes (gloo); student {n_params / 1e6:.2f}M parameters"
        )
        print(f"{'part':32s} {'full copy MiB':>14s} {'per process MiB (max)':>22s} {'ratio':>7s}")
        for (name, _), f, m in zip(rows, full, largest.tolist()):
            print(f"{name:32s} {f / mib:14.2f} {m / mib:22.2f} {m / f:7.3f}")
        f, m = sum(full), float(largest.sum())
        total = f"{'all (16·N_s)':32s} {f / mib:14.2f} {m / mib:22.2f} {m / f:7.3f}"
        print(f"{total}  (1/world_size = {1 / world:.3f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
