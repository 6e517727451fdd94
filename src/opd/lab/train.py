"""Supervised training of the lab's tiny models on worked solutions (how the zoo is made).

Each example is the exact text a chat model sees and produces at OPD time::

    apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    + solution + "<|im_end|>"

with the loss on the solution tokens and the end-of-turn token only (token-mean cross-entropy). The
data is an endless seeded stream of train-split problems (``world.problem_stream``), so two runs with
the same spec and seed see the same batches in the same order.

Determinism: everything is seeded, training runs in float32 on CPU with ``torch.set_num_threads(1)``
(the result of a float reduction may depend on how it is split over threads), so the same spec and seed
give bit-identical weights on the same machine and torch build.

Deliberately left out: mixed precision (no measurable speed-up at these sizes), packing, gradient
accumulation and checkpoint resume; a zoo model trains in minutes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from opd.lab import world


@dataclass(frozen=True)
class ModelSpec:
    """How one zoo model is made: architecture, training data and optimiser schedule."""

    name: str
    pattern: str  # solution style it is trained on: "a" or "b"
    hard_fraction: float  # each training problem is hard with this probability, else easy
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    arch: str = "qwen2"
    init_std: float = 0.08  # larger than HF's 0.02: tiny models then leave the initial plateau fast
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: float = 0.05  # fraction of steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    init_from: str | None = None  # another spec's name: continue training from its weights
    seed_offset: int = 0  # combined with the build seed (seed * 1000 + offset): own init and data order
    notes: str = ""  # one line on the model's role, copied into build_info.json
    prompt_template: str | None = (
        None  # world.TEMPLATE_VARIANTS value the prompts are wrapped in (None: plain)
    )


def encode_example(tokenizer, prompt: str, solution: str) -> tuple[list[int], int]:
    """Token ids of prompt (chat template, generation prompt) + solution + EOS, and the prompt length."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    p_ids = tokenizer.encode(head, add_special_tokens=False)
    r_ids = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
    return p_ids + r_ids, len(p_ids)


def make_batch(
    tokenizer, problems: list[world.Problem], pattern: str, template: str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the response).
    ``template``: a ``{problem}`` template the prompt is wrapped in (:data:`world.TEMPLATE_VARIANTS`), as
    opd's ``prompt_template`` renders it."""
    from opd.data import apply_template  # here: opd.data reads lab sources, so it imports opd.lab

    seqs = [
        encode_example(tokenizer, apply_template(p.prompt(), template), p.solution(pattern)) for p in problems
    ]
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        labels[b, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build_model(spec: ModelSpec, tokenizer, *, seed: int):
    """A freshly initialised Qwen2 (or Llama) model of ``spec``'s shape, weights ~ N(0, init_std)."""
    # lazy: the model classes load transformers' modeling stack (seconds); opd.lab imports this module
    # on every command, and only `opd lab build` builds models
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=256,
        initializer_range=spec.init_std,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if spec.arch not in classes:
        raise ValueError(f"arch={spec.arch!r}: expected one of {sorted(classes)}")
    config_cls, model_cls = classes[spec.arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def lr_at(step: int, spec: ModelSpec) -> float:
    warm = max(1, int(spec.warmup * spec.steps))
    if step < warm:
        return spec.lr * (step + 1) / warm
    frac = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(
    spec: ModelSpec,
    tokenizer,
    *,
    seed: int = 0,
    init_model=None,
    progress: bool = False,
    progress_queue=None,
):
    """Train ``spec`` from scratch (or from ``init_model``) and return ``(model, log)``.

    ``log`` holds the loss every 50 steps, tokens seen and wall time. ``progress`` shows a bar;
    ``progress_queue`` (a multiprocessing queue) instead receives the number of steps done every 10 steps.
    """
    torch.set_num_threads(1)
    s = seed * 1000 + spec.seed_offset
    model = build_model(spec, tokenizer, seed=s) if init_model is None else init_model
    torch.manual_seed(s)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    stream = world.problem_stream(s, "train", spec.hard_fraction)
    bar = None
    if progress:
        bar = tqdm(total=spec.steps, desc=f"train {spec.name}", leave=False)
    log = {"loss": [], "tokens": 0}
    t0 = time.perf_counter()
    running = None
    for step in range(spec.steps):
        problems = [next(stream) for _ in range(spec.batch_size)]
        batch = make_batch(tokenizer, problems, spec.pattern, spec.prompt_template)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["tokens"] += int(batch["attention_mask"].sum())
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == spec.steps - 1:
            log["loss"].append((step, round(loss.item(), 5)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
        if progress_queue is not None and (step + 1) % 10 == 0:
            progress_queue.put(10)
    if bar is not None:
        bar.close()
    if progress_queue is not None and spec.steps % 10:
        progress_queue.put(spec.steps % 10)
    log["seconds"] = time.perf_counter() - t0
    model.eval()
    return model, log
