"""A sharded student for ``opd train``: FSDP2 (``torch.distributed.fsdp.fully_shard``), ``fsdp=true``.

Under ``torchrun`` (or ``accelerate launch`` with an FSDP2 config, :func:`accelerate_fsdp_error`) the
student's float32 master weights, their gradients and AdamW's state are sharded across the processes:
each holds 1/world_size of them. What this module does, and why each piece is needed:

- :func:`shard_student` — ``fully_shard`` on every decoder layer and on the ``*ForCausalLM`` root (the
  root's unit holds the embeddings, the final norm and the output head, tied or not). No
  ``MixedPrecisionPolicy``: the parameters are all-gathered in float32 and the forward runs under the
  same autocast as without FSDP (:mod:`opd.precision`), so the numerics are a one-process run's. The
  gradient divide factor is set to 1 with a plain SUM reduce-scatter (gloo has no ``PREMUL_SUM``): FSDP2
  averages gradients over the processes by default, while opd's loss is already divided by the *global*
  token count (``Runtime.sum``), so the shares must be summed.
  The root's forward runs first on every process (the scoring head's one-time check,
  ``opd.scoring.check_head_path``), so it is the root FSDP initialises (FSDP makes the first module that
  runs forward the root; the scoring path calls the decoder directly).
  HF ``generate`` then runs with ``synced_gpus`` (transformers turns it on for a module marked
  ``_is_fsdp_managed_module``): a process whose responses ended keeps stepping until every process is done,
  because each forward all-gathers each layer's weights.
- :class:`ShardedScorer` — the student's :class:`opd.scoring.PolicyScorer` under FSDP. Scoring runs the
  decoder and then the float32 head itself (``opd.scoring.head``), outside the root's forward, so the
  root's parameters would still be shards: ``forward`` all-gathers them first (``FSDPModule.unshard``);
  a no-grad call reshards them at its end, a call with grad leaves that to the backward's final callback,
  which reduce-scatters their gradients and reshards them. The root also reshards after its own forward
  (generate), so between scorer calls every parameter is a shard — the objects the optimiser and the
  gradient clipping hold (a gathered root would hand ``parameters()`` its unsharded copies). A
  micro-batch without a scored position (``score`` would return zeros without running the model) first
  runs a one-row stand-in forward, and with grad enabled its zero-weighted backward at once, so every
  process makes the same collective calls. The full-vocabulary passes (``objective=full``) go through
  the same ``forward``: their backward (inside it for the fused step) reaches the root's gathered head
  and the sharded layers like any other.
- lockstep: every process must make the same forward and backward calls of the student. Rows per
  process are equal (:func:`check_fsdp` requires ``prompts_per_step`` divisible by the number of
  processes), so generate calls and micro-batch counts are equal; the shared-prefill shortcut of the HF
  backend (data-dependent) is switched off; evaluation during training (rank 0 only) is refused.
- the update: gradients arrive reduce-scattered and summed as DTensor shards, so
  ``Runtime.all_reduce_grads`` leaves them alone; ``clip_grad_norm_`` over DTensor gradients gives the
  global norm (the one-process norm), and AdamW steps the shards (:func:`reshard_before_steps`).
- checkpoints: :func:`full_state` gathers the full model and optimiser state dicts to rank 0
  (``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``);
  rank 0 writes them in the usual format (safetensors, ``torch.save`` of plain tensors) through an
  unsharded CPU copy of the model (:func:`unsharded_copy`); resume reads them on every process and
  loads them with ``set_model_state_dict`` / ``set_optimizer_state_dict`` (:func:`loaders`). ``final/``
  is the full model, written by rank 0.

What it leaves out: other methods (``sft``, ``kd``, ``gkd``, ``grpo``, ``coldstart`` refuse ``fsdp``),
LoRA, the vLLM backend, CPU offload, FSDP's MixedPrecisionPolicy, sharding the
teacher (each process holds a full teacher), and resuming a checkpoint across fsdp=true/false (the
optimiser state is keyed by parameter names under FSDP). Tested on CPU with gloo only; NCCL is untested.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from opd.errors import ConfigError
from opd.scoring import PolicyScorer, check_head_path

_TRUE = ("1", "true", "yes")


def accelerate_fsdp_error(cfg: Any) -> str | None:
    """None when an ``accelerate launch`` FSDP config (``ACCELERATE_USE_FSDP`` set) maps onto opd's sharded
    student, else the one-line reason. It maps when the command has ``fsdp=true`` (``opd train``), the
    config asks for FSDP version 2, no parameter offload and ``mixed_precision: "no"`` (opd sets the
    precision itself: ``student_dtype``)."""
    if not hasattr(cfg, "fsdp"):
        return "this method does not shard the student (only opd train does, with fsdp=true)"
    if not cfg.fsdp:
        return "set fsdp=true on the command line or in the YAML (opd does not infer it from the launcher)"
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        return f"FSDP_VERSION={version}: opd shards with FSDP2; set fsdp_version: 2 in the accelerate config"
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE:
        return "fsdp_offload_params: true is not supported; set it to false"
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", ""):
        return (
            f'mixed_precision: {mp}: set mixed_precision: "no" and student_dtype=bfloat16 '
            "(opd autocasts itself)"
        )
    return None


def check_fsdp(cfg: Any, world_size: int) -> None:
    """The rules of ``fsdp=true`` that need the number of processes (one-line :class:`ConfigError`)."""
    if world_size < 2:
        from opd.runtime import ACCELERATE_ONE_CPU_PROCESS, accelerate_started_one_cpu_process

        if accelerate_started_one_cpu_process():
            raise ConfigError(f"fsdp=true with 1 process: {ACCELERATE_ONE_CPU_PROCESS}")
        raise ConfigError(
            "fsdp=true with 1 process: sharding needs several; launch with torchrun --nproc_per_node N "
            "(N >= 2) or accelerate launch, or drop fsdp=true"
        )
    if cfg.prompts_per_step % world_size:
        raise ConfigError(
            f"fsdp=true: prompts_per_step={cfg.prompts_per_step} is not divisible by the {world_size} "
            "processes (every process must run the same number of forward passes of the sharded student); "
            f"set prompts_per_step to a multiple of {world_size}"
        )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer ``ModuleList`` of a HF causal LM (``model.model.layers`` for Llama / Qwen / ...)."""
    from opd.models import _find_layers

    parent, attr = _find_layers(model)
    return getattr(parent, attr)


def shard_student(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place (each decoder layer, then the root) and make it FSDP's root; returns it."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum the shares: the loss is a global token mean
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    model._is_fsdp_managed_module = True  # transformers' generate then uses synced_gpus
    # The root runs forward first, so FSDP initialises it as the root: the scoring head's one-time check
    # (its own forward, then the decoder and head called directly, with the root still gathered: FSDP
    # keeps a root gathered after its forward by default).
    check_head_path(model)
    # The root's own forward is generate's from now on: reshard it after each, so outside a scorer call
    # every parameter is a shard
    model.set_reshard_after_forward(True, recurse=False)
    model.reshard()
    return model


class ShardedScorer(PolicyScorer):
    """:class:`PolicyScorer` of an FSDP-sharded student (module docstring): gathers the root's parameters
    before the direct head calls, and runs a stand-in pass for a micro-batch with nothing to score."""

    lockstep = True

    def forward(self, input_ids_B_T, attention_mask_B_T, response_mask_B_T, given_ids_B_T_K=None, **kw):
        self.model.unshard()  # embeddings, final norm, head: gathered for the direct head calls
        if not bool((response_mask_B_T != 0).any()):
            self._stand_in(input_ids_B_T.device)
        # with nothing to score, the zeros of the caller's shapes, without running the model
        out = super().forward(input_ids_B_T, attention_mask_B_T, response_mask_B_T, given_ids_B_T_K, **kw)
        if not torch.is_grad_enabled():
            self.model.reshard()  # with grad, the backward's final callback reshards it
        return out

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Around a rollout: the root's parameters stay gathered from the first decoding step to the last
        (one all-gather of the embeddings and head per rollout, not one per generated token), then are
        resharded; the decoder layers still gather and reshard at each step."""
        self.model.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            self.model.set_reshard_after_forward(True, recurse=False)
            self.model.reshard()

    def _stand_in(self, device: torch.device) -> None:
        """The collectives of a real pass for a call with nothing to score: one row of two tokens scored
        at its second, and with grad enabled its backward weighted by 0 (the caller has no loss to
        backpropagate for such a micro-batch)."""
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        out = super().forward(ids, torch.ones_like(ids), torch.tensor([[0, 1]], device=device))
        if torch.is_grad_enabled():
            (out.token_logp_B_T.sum() * 0.0).backward()


def reshard_before_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reshard the root before every ``optimizer.step`` (a hook), so a gathered copy of the root's
    parameters (left by a no-grad pass) never outlives an update: the next forward gathers the new values."""
    optimizer.register_step_pre_hook(lambda *_: model.reshard())


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """The full model and optimiser state dicts, on rank 0's CPU (empty on the others). Every process
    must call it (it all-gathers)."""
    model.reshard()
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=_FULL)
    return model_sd, optim_sd


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model of ``model``'s class and config holding ``state_dict`` (rank 0), for saving only:
    its non-persistent buffers (rotary tables) stay on the meta device."""
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # not FSDP's subclass
    with torch.device("meta"):
        copy = cls(model.config)
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    copy.tie_weights()
    still = [k for k in missing if copy.get_parameter(k).is_meta]
    if still or unexpected:
        raise RuntimeError(f"unsharded copy: missing={still} unexpected={unexpected}")
    copy.generation_config = model.generation_config
    return copy.eval()


def loaders(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """``(load_model, load_optimizer)``: callables that load full state dicts (read from a checkpoint by
    every process) into the sharded model and optimiser."""
    full = StateDictOptions(full_state_dict=True)

    def load_model(sd: dict[str, torch.Tensor]) -> None:
        model.reshard()
        tied = getattr(model, "_tied_weights_keys", None)  # transformers 5: {tied key: the key it shares}
        if getattr(model.config, "tie_word_embeddings", False) and isinstance(tied, dict):
            # a saved tied head is stored once (safetensors); the full state dict names both
            sd = {**sd, **{k: sd[src] for k, src in tied.items() if k not in sd and src in sd}}
        set_model_state_dict(model, sd, options=full)

    def load_optimizer(osd: dict) -> None:
        set_optimizer_state_dict(model, optimizer, osd, options=full)

    return load_model, load_optimizer
