"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: the sharded student's lockstep with
unequal work per process, against one unsharded copy of the same model.

1. generate: rank 0's rows stop at their first token (its stop id is its own first greedy token), rank 1's
   never stop early; transformers' ``synced_gpus`` keeps rank 0 stepping, and each rank's tokens are the
   unsharded model's greedy tokens for the same prompts and stop ids.
2. scoring with grad: rank 0 has two micro-batches with response tokens, rank 1 one and then one without
   any (a stand-in pass, no loss); the gradients summed by FSDP equal the one-process gradients of all
   the loss micro-batches (embedding / tied head included), and so does ``clip_grad_norm_``'s norm.
3. the same split through the fused full-vocabulary pass (``objective=full``: the scorer call takes the
   exact KL's backward itself): the same gradients as one process.
4. the scoring of 2. on a model whose output head is not tied to its embeddings.

Prints ``FSDP-LOCKSTEP-OK`` on rank 0 when every check holds (an assertion fails otherwise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opd.fsdp import ShardedScorer, shard_student
from opd.methods.opd_scoring import reverse_kl
from opd.scoring import PolicyScorer
from opd.tiny import build_byte_tokenizer, build_tiny_model


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    tok = build_byte_tokenizer()
    sharded = build_tiny_model(tok, seed=3)
    single = build_tiny_model(tok, seed=3)
    shard_student(sharded)
    scorer, scorer1 = ShardedScorer(sharded, chunk_size=4), PolicyScorer(single, chunk_size=4)

    # 1. generate with different response lengths per process
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, 5), generator=g) for _ in range(world)]
    with torch.no_grad():
        first = [int(single.generate(p, max_new_tokens=1, do_sample=False)[0, -1]) for p in prompts]
    stop = [first[0], tok.eos_token_id]  # rank 0 stops at once; rank 1 at EOS only
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        mine = sharded.generate(prompts[rank], eos_token_id=stop[rank], **kw)
        ref = single.generate(prompts[rank], eos_token_id=stop[rank], **kw)
    n = min(mine.shape[1], ref.shape[1])
    assert torch.equal(mine[:, :n], ref[:, :n]), (rank, mine, ref)
    lengths = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([ref.shape[1]]))
    assert int(lengths[0]) < int(lengths[1]), lengths  # the work really was unequal

    # 2. micro-batches: rank 1's second has no response token
    x = torch.randint(3, 256, (6, 10), generator=g)
    att = torch.ones_like(x)
    resp = torch.zeros_like(x)
    resp[:, 6:] = 1
    micro = {0: [slice(0, 2), slice(2, 4)], 1: [slice(4, 6), None]}
    total = 6 * 4  # the global token count of the loss micro-batches

    def loss(s: PolicyScorer, sl: slice | None):
        ids, a, r = (x[sl], att[sl], resp[sl]) if sl is not None else (x[:1], att[:1], resp[:1] * 0)
        out = s(ids, a, r, top_k=3, entropy=True)
        if r.sum() == 0:
            return None
        return ((out.token_logp_B_T + 0.1 * out.entropy_B_T) * r).sum() / total

    for sl in micro[rank]:
        value = loss(scorer, sl)
        if value is not None:
            value.backward()
    for r in range(world):
        for sl in micro[r]:
            value = loss(scorer1, sl)
            if value is not None:
                value.backward()
    ref_grads = dict(single.named_parameters())
    worst = 0.0
    for name, p in sharded.named_parameters():
        assert p.grad is not None, name
        worst = max(worst, float((p.grad.full_tensor() - ref_grads[name].grad).abs().max()))
    norm = float(torch.nn.utils.clip_grad_norm_(list(sharded.parameters()), float("inf")))
    norm1 = float(torch.nn.utils.clip_grad_norm_(list(single.parameters()), float("inf")))
    assert worst <= 1e-6, worst
    assert abs(norm - norm1) <= 1e-6 * norm1, (norm, norm1)

    # 3. the fused full-vocabulary pass (its backward runs inside the scorer call), same split of work
    teacher = build_tiny_model(tok, seed=4).requires_grad_(False)
    for model in (sharded, single):
        model.zero_grad(set_to_none=True)

    def fused(s: PolicyScorer, sl: slice | None) -> None:
        ids, a, r = (x[sl], att[sl], resp[sl]) if sl is not None else (x[:1], att[:1], resp[:1] * 0)
        s(ids, a, r, top_k=3, teacher=teacher, divergence=reverse_kl, loss_weight_B_T=r.float() / total)

    for sl in micro[rank]:
        fused(scorer, sl)
    for r in range(world):
        for sl in micro[r]:
            fused(scorer1, sl)
    worst_full = max(
        float((p.grad.full_tensor() - ref_grads[name].grad).abs().max())
        for name, p in sharded.named_parameters()
    )
    scale_full = max(float(p.grad.abs().max()) for p in single.parameters())
    assert scale_full > 1e-4 and worst_full <= 1e-6, (worst_full, scale_full)  # real gradients, equal
    # 4. an untied output head (its own unit's parameter, beside the embeddings): the same gradients
    config = single.config.to_dict() | {"tie_word_embeddings": False}
    torch.manual_seed(5)
    untied = type(single)(type(single.config).from_dict(config))
    untied1 = type(single)(type(single.config).from_dict(config))
    untied1.load_state_dict(untied.state_dict())
    assert untied1.lm_head.weight is not untied1.model.embed_tokens.weight
    shard_student(untied)
    s_untied, s_untied1 = ShardedScorer(untied, chunk_size=4), PolicyScorer(untied1, chunk_size=4)
    for sl in micro[rank]:
        value = loss(s_untied, sl)
        if value is not None:
            value.backward()
    for r in range(world):
        for sl in micro[r]:
            value = loss(s_untied1, sl)
            if value is not None:
                value.backward()
    ref_untied = dict(untied1.named_parameters())
    worst_untied = max(
        float((p.grad.full_tensor() - ref_untied[name].grad).abs().max())
        for name, p in untied.named_parameters()
    )
    assert float(ref_untied["lm_head.weight"].grad.abs().max()) > 0 and worst_untied <= 1e-6, worst_untied
    if rank == 0:
        print(
            f"FSDP-LOCKSTEP-OK max|grad diff| {worst:.2e} (norm {norm:.6f} vs {norm1:.6f}), full vocabulary "
            f"{worst_full:.2e} (of gradients up to {scale_full:.2e}), untied head {worst_untied:.2e}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
