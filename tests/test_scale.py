"""Single-node scale features on the tiny pair: LoRA adapters, gradient checkpointing, experiment tracking."""

import json

import pytest
import torch
import transformers.modeling_utils
from opd_configs import make_cfg
from safetensors.torch import load_file

from opd.config import ConfigError
from opd.methods import opd as opd_method
from opd.models import load_model
from opd.tracking import read_metrics

peft = pytest.importorskip("peft")  # the `peft` extra; `make setup` installs it


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_lora_trains_only_the_adapter_and_saves_merged_plus_adapter(tiny_pair, tmp_path):
    student_dir = tiny_pair[0]
    res = opd_method.train(make_cfg(tiny_pair, tmp_path, steps=3, lr=5e-2, lora_r=4, lora_alpha=8))
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # the merged model loads as a plain model and differs from the start (the adapter learned something)
    base, merged = _weights(student_dir), _weights(final)
    assert set(base) == set(merged)  # no lora_* keys: merged into the base weights
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    # only linear layers that received adapters changed: embeddings and norms are untouched
    assert not any("embed" in k or "norm" in k for k in changed)
    # base + adapter == merged
    model = peft.PeftModel.from_pretrained(
        load_model(str(student_dir)), str(final / "adapter")
    ).merge_and_unload()
    for k, v in model.state_dict().items():
        if k in merged:
            torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    assert res["steps_done"] == 3


def test_lora_resume_equals_an_uninterrupted_run(tiny_pair, tmp_path):
    kw = dict(lr=5e-2, lora_r=4, save_every=1)
    opd_method.train(make_cfg(tiny_pair, tmp_path / "a", steps=3, **kw))
    opd_method.train(make_cfg(tiny_pair, tmp_path / "b", steps=2, **kw))
    opd_method.train(make_cfg(tiny_pair, tmp_path / "b", steps=3, resume=True, **kw))
    a, b = _weights(tmp_path / "a" / "run" / "final"), _weights(tmp_path / "b" / "run" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_bad_lora_settings_are_one_line_errors(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="lora_r=-1"):
        make_cfg(tiny_pair, tmp_path, lora_r=-1)
    with pytest.raises(ConfigError, match="lora_target_modules='nope'"):
        opd_method.train(make_cfg(tiny_pair, tmp_path, lora_r=2, lora_target_modules="nope"))


def test_gradient_checkpointing_gives_the_same_run(tiny_pair, tmp_path, monkeypatch):
    opd_method.train(make_cfg(tiny_pair, tmp_path / "a", steps=2))
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    opd_method.train(make_cfg(tiny_pair, tmp_path / "b", steps=2, gradient_checkpointing=True))
    assert calls  # the decoder layers really were checkpointed
    a, b = _weights(tmp_path / "a" / "run" / "final"), _weights(tmp_path / "b" / "run" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_report_to_tensorboard_logs_the_metrics_jsonl_names(tiny_pair, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opd_method.train(make_cfg(tiny_pair, tmp_path, steps=2, report_to="tensorboard"))
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"loss/pg", "kl/sampled", "overlap/ratio", "cost/flops"} <= tags
    assert [e.value for e in acc.Scalars("kl/sampled")] == pytest.approx([r["kl/sampled"] for r in rows])


def test_unknown_tracker_is_refused(tiny_pair, tmp_path):
    with pytest.raises(ConfigError, match="report_to='mlflow'"):
        make_cfg(tiny_pair, tmp_path, report_to="mlflow")
