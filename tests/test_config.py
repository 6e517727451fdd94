import pytest

from opd.cli import build_parser, main
from opd.config import ConfigError, OPDConfig
from opd.config_io import (
    below,
    config_values,
    dtype_errors,
    field_docs,
    load_config,
    parse_overrides,
    raise_errors,
    require_keys,
)


def test_defaults_follow_the_paper():
    cfg = OPDConfig()
    assert (cfg.objective, cfg.support_size, cfg.support, cfg.weighting, cfg.loss_aggregation) == (
        "topk",
        16,
        "student",
        "student_p",
        "token-mean",
    )
    assert cfg.temperature == 1.0 and cfg.top_p == 1.0 and cfg.teacher_temperature == 1.0
    assert cfg.clip_eps == 0.2 and cfg.dual_clip == 3.0 and cfg.grad_clip == 1.0
    assert cfg.trust_remote_code is False


def test_every_field_has_a_docstring():
    docs = field_docs(OPDConfig)
    missing = [f for f in OPDConfig.__dataclass_fields__ if not docs.get(f)]
    assert missing == []


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "student: a\nteacher: b\nprompts: p.jsonl\nsteps: 3\nlr: 1.0e-4\nchat_template_kwargs: {enable_thinking: false}\n"
    )
    cfg = load_config(
        OPDConfig, p, ["steps=5", "support=union", "prompt_template={problem} go", "adam_betas=[0.8, 0.9]"]
    )
    assert cfg.steps == 5 and cfg.support == "union" and cfg.lr == 1e-4
    assert cfg.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.prompt_template == "{problem} go"
    assert cfg.adam_betas == (0.8, 0.9)
    assert load_config(OPDConfig, None, ["student=lab:student"]).student == "lab:student"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("support=overlap", "support='overlap'"),
        ("weighting=none", "weighting"),
        ("loss_aggregation=mean", "loss_aggregation"),
        ("objective=top_k", "objective='top_k'"),
        ("support_size=0", "support_size=0"),
        ("steps=0", "steps=0"),
        ("lr=0", "lr=0"),
        ("top_p=1.5", "top_p"),
        ("student_dtype=int8", "student_dtype"),
        ("steps=abc", "steps='abc'"),
        ("eval_every=5", "eval_prompts"),
        ("warmup_steps=500", "warmup_steps"),
    ],
)
def test_bad_values_name_the_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(OPDConfig, None, [override])
    assert needle in str(e.value)


def test_renormalize_with_symmetric_difference_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(OPDConfig, None, ["renormalize=true", "support=symmetric_difference"])
    assert "renormalize=true with support=symmetric_difference" in str(e.value)
    assert "set renormalize=false or choose another support" in str(e.value)
    for support in ("student", "teacher", "intersection", "union"):
        assert load_config(OPDConfig, None, ["renormalize=true", f"support={support}"]).renormalize


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'support_size'"):
        load_config(OPDConfig, None, ["support_sizes=4"])


@pytest.mark.parametrize(
    "old, fix",
    [
        ("top_k=16", "objective=topk support_size=K"),
        ("rollout_top_k=0", "use sample_top_k"),
        ("out_dir=runs/x", "use output_dir"),
    ],
)
def test_a_renamed_key_names_its_replacement(old, fix):
    with pytest.raises(ConfigError) as e:
        load_config(OPDConfig, None, [old])
    assert "was renamed" in str(e.value) and fix in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_missing_required_keys_have_a_fix():
    with pytest.raises(ConfigError, match="student=lab:student"):
        OPDConfig().check_runnable()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(OPDConfig, tmp_path / "nope.yaml")


def test_config_values_reads_the_file_then_the_overrides_for_every_loader(tmp_path):
    """One reader of YAML + overrides for opd train / eval / compare (their errors name the file)."""
    from opd.compare.config import load_compare_config
    from opd.evaluation import load_eval_config

    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nlr: 0.5\n")
    assert config_values(path, ["seed=4", "steps=2"]) == {"seed": 4, "lr": 0.5, "steps": 2}
    assert config_values(None, {"seed": 5}) == {"seed": 5}
    assert load_config(OPDConfig, path, ["seed=4"]).seed == 4
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    for load, what in (
        (lambda p: load_config(OPDConfig, p), "config file"),
        (lambda p: load_eval_config(p), "config file"),
        (lambda p: load_compare_config(p), "compare config file"),
    ):
        with pytest.raises(ConfigError, match=f"^{what} .*nope.yaml' not found"):
            load(tmp_path / "nope.yaml")
        with pytest.raises(ConfigError, match=f"^{what} .*list.yaml': expected a mapping of key: value"):
            load(listed)


def test_shared_rule_helpers_name_the_key_the_value_and_the_fix():
    from types import SimpleNamespace

    cfg = SimpleNamespace(a=0, b=2, c=-1, d="float64", e="bfloat16", student="", prompts="p")
    assert below(cfg, ("a", "b", "c"), 1) == ["a=0: must be >= 1", "c=-1: must be >= 1"]
    assert below(cfg, ("c",), 0, " (0 = all)") == ["c=-1: must be >= 0 (0 = all)"]
    assert dtype_errors(cfg, ("d", "e")) == ["d='float64': choose float32, bfloat16 or float16"]
    raise_errors([])  # nothing to report
    with pytest.raises(ConfigError, match="^invalid diagnose config:\n  - x\n  - y$"):
        raise_errors(["x", "y"], "diagnose config")
    require_keys(cfg, ("prompts",), "prompts=lab:train")
    with pytest.raises(
        ConfigError, match="missing required key.s.: student, pools; .* e.g. student=lab:student$"
    ):
        require_keys(cfg, ("student", "prompts"), "student=lab:student", ("pools",))
    with pytest.raises(ConfigError, match="^invalid config:\n  - steps=0: must be >= 1"):
        OPDConfig(steps=0)


def test_help_lists_every_key(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for name in OPDConfig.__dataclass_fields__:
        assert f"  {name} (" in out, name
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "demo" in out and "support_size (" in out


def test_cli_reports_config_errors(capsys):
    assert main(["train", "support=bogus"]) == 2
    assert "support='bogus'" in capsys.readouterr().err


def test_shipped_configs_parse():
    from pathlib import Path

    from opd.compare import load_compare_config, plan_runs
    from opd.methods import METHODS
    from opd.remedies import RecipeConfig

    by_command = {m.command: m.config for m in METHODS} | {"recipe": RecipeConfig}
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):  # <command>_*.yaml is that method's config, else opd train's
        if path.name.startswith("compare"):  # an `opd compare` config: every run validates
            plan_runs(load_compare_config(path))
            continue
        cfg = load_config(by_command.get(path.stem.split("_")[0], OPDConfig), path)
        cfg.check_runnable()


def test_alert_thresholds_reach_the_monitor():
    from opd.alerts import AlertConfig

    cfg = load_config(OPDConfig, None, ["alert_thresholds={window: 7, grad_norm_spike_factor: null}"])
    ac = AlertConfig(**cfg.alert_thresholds)
    assert ac.window == 7 and ac.grad_norm_spike_factor is None
