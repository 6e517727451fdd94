"""The tiny OPD run the training tests share: 2 steps of 2 prompts x 2 rollouts x 6 new tokens on the
``tiny_pair`` fixture (conftest.py), overridable key by key."""

from opd.config import OPDConfig


def make_cfg(tiny_pair, tmp_path, **kw) -> OPDConfig:
    student, teacher, prompts = tiny_pair
    base = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=6,
        micro_batch_size=3,
        lr=1e-3,
        weight_decay=0.0,
        progress=False,
        seed=0,
        alerts=False,
    )
    base.update(kw)
    return OPDConfig(**base)
