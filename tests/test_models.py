"""Loading / saving, student-teacher compatibility and layer dropping on tiny hub-free models."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import require_module

from opd.lab import LabNameError
from opd.lab.zoo import ZOO_ENV
from opd.models import (
    CompatReport,
    TokenizerMismatchError,
    check_compatibility,
    drop_layers,
    load_model,
    load_tokenizer,
    save_model,
)
from opd.rollout import HFGenerateBackend, stop_token_ids
from opd.tiny import CHATML_TEMPLATE, IM_END, IM_START, PAD, build_byte_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """(directory, model) of a tiny Llama saved with save_model."""
    model = build_tiny_model(tok, arch="llama", num_layers=3, seed=0)
    out = save_model(model, tok, tmp_path_factory.mktemp("ckpt") / "m")
    return out, model


def _swapped_tokenizer(a: str, b: str):
    """A byte tokenizer whose tokens ``a`` and ``b`` have each other's ids (same strings, other ids)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab[a], vocab[b] = vocab[b], vocab[a]
    for s in (PAD, IM_START, IM_END):
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


# ----------------------------------------------------------------------------------------------- loading


def test_save_load_round_trip(saved, tok):
    out, model = saved
    assert (out / "model.safetensors").is_file()
    loaded = load_model(out)
    assert type(loaded) is type(model) and loaded.dtype == torch.float32
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    tok2 = load_tokenizer(out)
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2.chat_template == tok.chat_template
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    text = "Hi there,\n  two spaces"
    assert tok2.decode(tok2(text)["input_ids"]) == text


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)]
)
def test_load_dtype(saved, dtype, expected):
    assert load_model(saved[0], dtype=dtype).dtype == expected


def test_bad_dtype_names_value_and_choices(saved):
    with pytest.raises(ValueError, match=r"dtype='fp8'.*'float32', 'bfloat16', 'float16'"):
        load_model(saved[0], dtype="fp8")


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model path .*nope.* not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("missing-model.gguf")


def test_missing_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_model("opd-test-org/no-such-model")
    msg = str(err.value)
    assert "'opd-test-org/no-such-model' was not found" in msg and "HF_HUB_OFFLINE" in msg
    assert "local checkpoint directory" in msg


def test_directory_without_config_lists_gguf_files(tmp_path):
    (tmp_path / "weights.Q4.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config.json.*weights.Q4.gguf.*gguf_file="):
        load_model(tmp_path)


def test_lab_prefix_resolves_through_the_zoo_dir(saved, tmp_path, monkeypatch):
    monkeypatch.setenv(ZOO_ENV, str(tmp_path))
    shutil.copytree(saved[0], tmp_path / "student")
    assert load_model("lab:student").config.num_hidden_layers == 3
    assert len(load_tokenizer("lab:student")) == len(saved[1].get_input_embeddings().weight)
    with pytest.raises(FileNotFoundError, match=r"'teacher-a-plus' is not built.*opd lab build"):
        load_model("lab:teacher-a-plus")


def test_lab_prefix_unknown_or_wrong_kind_lists_the_valid_names():
    for spec in ("lab:tiny", "lab:train"):
        with pytest.raises(LabNameError, match=rf"unknown lab model '{spec}'; lab models: lab:student, "):
            load_model(spec)


def _write_tiny_gguf(path, *, hidden=32, layers=2, inter=64, heads=4, kv_heads=2, seed=0):
    """A float32 Llama GGUF with the byte vocabulary of ``opd.tiny`` (tied embeddings); returns the
    token-embedding matrix written. Exercises the same loader as a real quantised file, in < 1 MB."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = [*bytes_to_unicode().values(), PAD, IM_START, IM_END]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 3)  # normal, then control tokens
    w.add_token_scores([0.0] * vocab)  # no merges: transformers derives them from the scores
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 3)
    w.add_bos_token_id(vocab - 2)
    w.add_chat_template(CHATML_TEMPLATE)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    embed = rand(vocab, hidden)
    w.add_tensor("token_embd.weight", embed)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    head_dim = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(inter, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return torch.from_numpy(embed)


def test_gguf_loads_dense_trainable_and_saves(tmp_path):
    require_module("gguf", "GGUF support needs the gguf package: pip install 'opd[gguf]'")
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    embed = _write_tiny_gguf(path)
    tok = load_tokenizer(path)
    assert (tok.eos_token, tok.pad_token, tok.chat_template) == (IM_END, PAD, CHATML_TEMPLATE)
    assert tok.decode(tok("Hi there,\n  x")["input_ids"]) == "Hi there,\n  x"
    assert check_compatibility(tok, build_byte_tokenizer()).vocab_limit == len(tok)

    model = load_model(path)  # same as load_model(tmp_path, gguf_file="tiny.gguf")
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in model.parameters())
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert load_model(tmp_path, gguf_file="tiny.gguf", dtype="bfloat16").dtype == torch.bfloat16

    # loaded by plain transformers, the model stays marked GGUF-quantised: save_model copies it first
    marked = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert marked.is_quantized
    reloaded = load_model(save_model(marked, tok, tmp_path / "saved"))
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in reloaded.state_dict().items())
    assert load_tokenizer(tmp_path / "saved").get_vocab() == tok.get_vocab()


# ----------------------------------------------------------------------------------------- compatibility


def test_same_tokenizer_is_compatible(tok):
    report = check_compatibility(tok, build_byte_tokenizer())
    assert report == CompatReport(vocab_limit=len(tok), warnings=[])


def test_mismatch_error_names_tokens_and_fix(tok):
    other = _swapped_tokenizer("a", "b")
    with pytest.raises(TokenizerMismatchError) as err:
        check_compatibility(tok, other)
    msg = str(err.value)
    ida, idb = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert "2 token(s)" in msg
    assert f"token 'a': student id {ida}, teacher id {idb}" in msg
    assert f"token 'b': student id {idb}, teacher id {ida}" in msg
    assert "teacher from the student's tokenizer family" in msg
    assert isinstance(err.value, ValueError)


def test_token_missing_from_one_side_is_a_mismatch(tok):
    other = build_byte_tokenizer(extra_tokens=["the"])  # 'the' takes id 256, shifting the specials
    with pytest.raises(TokenizerMismatchError, match=r"token 'the': not in the student, teacher id 256"):
        check_compatibility(tok, other)


def test_extra_tokens_at_the_end_limit_the_vocab(tok):
    teacher_tok = build_byte_tokenizer()
    teacher_tok.add_tokens(["<think>", "</think>"])
    report = check_compatibility(tok, teacher_tok)
    assert report.vocab_limit == len(tok)
    assert len(report.warnings) == 1 and "vocabulary sizes differ" in report.warnings[0]


def test_padded_embedding_tables_give_tokenizer_vocab_limit(tok):
    """Qwen-style: same tokenizer, tables padded to different sizes (like 151936 vs 152064 rows)."""
    student = build_tiny_model(tok, vocab_size=len(tok) + 5)
    teacher = build_tiny_model(tok, vocab_size=len(tok) + 69)
    report = check_compatibility(tok, tok, student, teacher)
    assert report.vocab_limit == len(tok)
    assert report.warnings == []


def test_embedding_table_smaller_than_tokenizer_is_an_error(tok):
    small = build_tiny_model(tok)
    small.resize_token_embeddings(200)  # a tokenizer that does not belong to this checkpoint
    with pytest.raises(TokenizerMismatchError, match=r"teacher model's input embedding table has 200 rows"):
        check_compatibility(tok, tok, teacher_model=small)


def test_chat_template_and_eos_differences_warn(tok):
    teacher_tok = build_byte_tokenizer()
    teacher_tok.chat_template = CHATML_TEMPLATE.replace("\n", "\n\n")
    teacher_tok.eos_token = PAD
    report = check_compatibility(tok, teacher_tok)
    assert report.vocab_limit == len(tok)
    text = " ".join(report.warnings)
    assert "chat templates differ" in text and "teacher's template" in text
    assert "EOS differs" in text and repr(PAD) in text
    with pytest.raises(TokenizerMismatchError, match="strict"):
        check_compatibility(tok, teacher_tok, strict=True)
    teacher_tok.chat_template = None
    assert any("missing in the teacher" in w for w in check_compatibility(tok, teacher_tok).warnings)


# ---------------------------------------------------------------------------------------- drop_layers


def test_drop_layers_keeps_chosen_weights_and_decodes_with_cache(tok):
    model = build_tiny_model(tok, num_layers=4, seed=3)
    small = drop_layers(model, [0, 3])
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # original untouched
    assert len(small.model.layers) == 2 and small.config.num_hidden_layers == 2
    assert len(small.config.layer_types) == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    for new, old in ((0, 0), (1, 3)):
        a, b = small.model.layers[new].state_dict(), model.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert small.model.layers[0].mlp.up_proj.weight is not model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(small.lm_head.weight, model.lm_head.weight)
    assert check_compatibility(tok, tok, small, model).vocab_limit == len(tok)
    # KV-cache decoding (renumbered layer_idx) agrees with a cache-free greedy loop
    prompt = tok("hello")["input_ids"]
    batch = HFGenerateBackend(small, tok, stop_token_ids(tok)).generate(
        [prompt], n=1, max_new_tokens=6, temperature=0, top_p=1.0, top_k=0, seed=None
    )
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(int(batch.response_lengths_B[0])):
            ids.append(int(small(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    assert batch.input_ids_B_T[0].tolist() == ids


def test_drop_no_layer_is_identity(tok):
    model = build_tiny_model(tok, num_layers=2, seed=4)
    same = drop_layers(model, [0, 1])
    x = torch.tensor([tok("abc")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(same(x).logits, model(x).logits)


@pytest.mark.parametrize("keep", [[], [1, 0], [0, 0], [0, 4], [-1]])
def test_drop_layers_bad_keep(tok, keep):
    model = build_tiny_model(tok, num_layers=4)
    with pytest.raises(ValueError, match="keep="):
        drop_layers(model, keep)


def test_save_model_is_atomic_and_replaces_only_a_model(saved, tmp_path):
    d, model = saved
    tok = load_tokenizer(d)
    out = save_model(model, tok, tmp_path / "m")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()

    class Broken:  # a crash half way through: the previous save survives untouched
        def save_pretrained(self, path):
            raise OSError("disk full")

    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_model(model, Broken(), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert save_model(model, tok, out) == out  # a saved model is replaced; the stale temporary goes too
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory or a saved model"):
        save_model(model, tok, other)
    assert (other / "todo.txt").read_text() == "keep me"
