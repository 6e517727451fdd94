"""Tiny, hub-free tokenizers and models for tests, benchmarks and the quick demo.

Everything here is built from configs on the fly: a byte-level vocabulary (every byte is one token, so
any text round-trips) plus ChatML special tokens, and random-init Qwen2 / Llama models. They go through
the same loading, scoring and training code as real checkpoints.

Note on transformers 5: ``AutoTokenizer`` picks the tokenizer class from the model's ``model_type``; a
custom pre-tokenizer would be replaced on reload, so we use ``Qwen2Tokenizer`` with an empty merge list,
which reloads identically.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def build_byte_tokenizer(extra_tokens: list[str] | None = None):
    """A byte-level ``Qwen2Tokenizer``: 256 byte tokens, then PAD, <|im_start|>, <|im_end|> (EOS).

    ``extra_tokens`` are added as ordinary whole-word tokens after the byte tokens (before specials).
    """
    # lazy (here and in build_tiny_model): transformers' tokenizer and model stacks take seconds to import,
    # and opd.lab imports this module on every command
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for t in extra_tokens or []:
        if t not in vocab:
            vocab[t] = len(vocab)
    for s in (PAD, IM_START, IM_END):
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(
    tokenizer,
    *,
    arch: str = "qwen2",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_positions: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
):
    """Random-init causal LM sized for a CPU test. ``vocab_size`` may exceed the tokenizer (padded table)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # lazy: see above

    kwargs = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        raise ValueError(f"arch={arch!r}: expected 'qwen2' or 'llama'")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_pair(out_dir: str | Path, *, seed: int = 0, **model_kwargs) -> tuple[Path, Path]:
    """Write a random student and a (differently seeded, larger) teacher with one shared tokenizer.

    Returns (student_dir, teacher_dir). Used by the quick demo, smoke tests and benchmarks.
    """
    out = Path(out_dir)
    tok = build_byte_tokenizer()
    student = build_tiny_model(tok, seed=seed, **model_kwargs)
    tkw = dict(model_kwargs)
    tkw["num_layers"] = tkw.get("num_layers", 2) + 1
    teacher = build_tiny_model(tok, seed=seed + 1, **tkw)
    paths = []
    for name, m in (("student", student), ("teacher", teacher)):
        d = out / name
        m.save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(d)
    return paths[0], paths[1]
