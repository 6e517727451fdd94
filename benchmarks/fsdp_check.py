"""Does torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) train a causal LM here? One short check.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_check.py            # CPU: gloo
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_check.py --device cuda  # 2 GPUs: NCCL

A tiny Qwen2 (random, built from a config) is sharded with ``fully_shard`` per decoder layer and at the
root; each process takes its half of a fixed batch, and ``--steps`` AdamW steps run with FSDP's
gradient reduce-scatter. A one-process copy trains on the whole batch (the mean of the halves' losses).
Rank 0 prints the largest gradient difference after the first backward, the largest weight difference
after the last step (the full state dict gathered with ``get_model_state_dict``), and whether
``generate`` runs on the sharded model (every process must call it: each forward all-gathers).
This is the bare-engine check docs/scaling.md quotes; opd's own sharded training (``opd train fsdp=true``,
``opd.fsdp``) is tested in tests/test_fsdp.py and sized by benchmarks/fsdp_memory.py.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).to(device)
    single = Qwen2ForCausalLM(cfg).to(device)
    single.load_state_dict(model.state_dict())
    start = {k: v.detach().cpu().clone() for k, v in single.state_dict().items()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt1 = torch.optim.AdamW(single.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2 * world, 12), generator=g).to(device)
    mine = x[2 * rank : 2 * rank + 2]
    grad_diff = None
    for step in range(a.steps):
        opt.zero_grad()
        model(input_ids=mine, labels=mine).loss.backward()  # FSDP2 averages the gradients over processes
        opt1.zero_grad()
        loss1 = sum(
            single(input_ids=x[2 * i : 2 * i + 2], labels=x[2 * i : 2 * i + 2]).loss for i in range(world)
        )
        (loss1 / world).backward()
        if step == 0:
            name_to_p1 = dict(single.named_parameters())
            grad_diff = max(
                float((p.grad.full_tensor() - name_to_p1[n].grad).abs().max())
                for n, p in model.named_parameters()
            )
        opt.step()
        opt1.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with torch.no_grad():
        out = model.generate(mine[:, :4], max_new_tokens=4, do_sample=False)
    if rank == 0:
        ref = {k: v.cpu() for k, v in single.state_dict().items()}
        weight_diff = max(float((full[k] - ref[k]).abs().max()) for k in full)
        moved = max(float((ref[k] - start[k]).abs().max()) for k in full)
        print(
            f"torch {torch.__version__}, {world} processes, {'NCCL' if cuda else 'gloo'}: fully_shard works"
        )
        print(f"max |grad FSDP2 - grad 1 process| after step 1: {grad_diff:.2e}")
        print(
            f"max |w FSDP2 - w 1 process| after {a.steps} AdamW steps: {weight_diff:.2e} "
            f"(the steps moved the weights by up to {moved:.2e})"
        )
        print(f"generate on the sharded model: {tuple(out.shape)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
