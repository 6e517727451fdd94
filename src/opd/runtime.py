"""Where models and tensors live: device choice in one place (STYLE.md §9).

``Runtime.from_config(cfg)`` turns the user's ``device`` / ``teacher_device`` strings into torch devices:

- ``auto``: ``cuda`` when torch sees a CUDA GPU, else ``mps`` (Apple silicon), else ``cpu``;
- ``cpu``, ``cuda``, ``cuda:N``, ``mps``: exactly that device, or a one-line :class:`ConfigError` when it
  is not available here (``device=cuda`` on a machine without a GPU names the fix, ``device=cpu``);
- ``teacher_device`` empty: the student's device.

Every method moves each model to its device once at load time; tensors follow their model (a rollout
batch goes to the student's device, the teacher's scoring inputs to the teacher's, its outputs back).
The dtype policy (float32 student master weights, autocast compute) is :mod:`opd.precision`'s.

Multi-process data parallel. Under ``torchrun`` (or ``accelerate launch``, which sets the same
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables) :meth:`Runtime.from_config` joins the process group
(NCCL on CUDA, gloo on CPU) and gives each process its device (``cuda:LOCAL_RANK`` for ``device=auto`` or
``cuda``). The collective helpers below are what a method needs for data parallelism: gradients summed
across processes once per optimiser step (:meth:`Runtime.all_reduce_grads`, the reduction DDP performs,
after local gradient accumulation), global counts (:meth:`Runtime.sum`), and one metrics row agreed by
all processes (:meth:`Runtime.reduce_row`), and Python values exchanged as JSON (:meth:`Runtime.gather_json`,
no pickling). In one process they are no-ops. Every method (``opd train``, ``sft``, ``kd``, ``gkd``,
``grpo``, ``coldstart``) runs through them.

Sharded student. ``opd train fsdp=true`` shards the student with FSDP2 (:mod:`opd.fsdp`): its gradients
then arrive reduce-scattered and summed as DTensor shards, so :meth:`Runtime.all_reduce_grads` leaves
them alone, and the rest of these helpers (counts, metrics rows) work unchanged. DeepSpeed is refused.

``accelerate launch`` on a machine without a GPU: a ``distributed_type: MULTI_GPU`` (or ``FSDP``) config
starts its N processes through torchrun, and they run on the CPU with gloo. With ``--cpu`` or a
``distributed_type: MULTI_CPU`` config accelerate starts a single process (it runs several CPU processes
only through mpirun) that has ``ACCELERATE_USE_CPU`` but no ``WORLD_SIZE``: that run is warned about
(:func:`accelerate_started_one_cpu_process`), and ``fsdp=true`` is refused there with the fix.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from opd.config import DEVICE_PATTERN, ConfigError

log = logging.getLogger("opd")

ACCELERATE_ONE_CPU_PROCESS = (
    "accelerate launch started a single process on the CPU (with --cpu or distributed_type: MULTI_CPU it "
    "runs several CPU processes only through mpirun); for N CPU processes drop --cpu and launch with a "
    "MULTI_GPU or FSDP config (configs/accelerate/ddp.yaml, fsdp.yaml) and --num_processes N: without a GPU "
    "they run on the CPU with gloo; or use torchrun --nproc_per_node N"
)


def accelerate_started_one_cpu_process() -> bool:
    """True in a process that ``accelerate launch`` started alone on the CPU: its single-process launcher
    (used for ``--cpu`` and ``MULTI_CPU`` configs) sets ``ACCELERATE_USE_CPU`` and no ``WORLD_SIZE``; the
    CPU is meant when that variable is true or torch sees no CUDA GPU."""
    if "ACCELERATE_USE_CPU" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    return os.environ["ACCELERATE_USE_CPU"].lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def resolve_device(value: str, key: str = "device") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda[:N]`` / ``mps`` → an available ``torch.device`` (ConfigError otherwise)."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"{key}={value!r}: choose auto, cpu, cuda, cuda:N or mps")
    if value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(value)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={value!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); use {key}=cpu or {key}=auto, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key}={value!r}: only {count} CUDA device(s) visible; use cuda:0..cuda:{count - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{key}={value!r}: the MPS backend is not available here; use {key}=cpu or {key}=auto"
        )
    return device


@dataclass(frozen=True)
class Runtime:
    """The devices of one run: ``device`` for the student (training, rollouts), ``teacher_device`` for
    the teacher (scoring only). Built once per run by :meth:`from_config`."""

    device: torch.device
    teacher_device: torch.device
    rank: int = 0
    """This process's rank (0 in a single-process run)."""
    world_size: int = 1
    """Number of data-parallel processes."""
    owns_group: bool = False
    """Whether this runtime joined the process group (and so leaves it in :meth:`close`); a run inside
    another (``opd coldstart``'s stages) shares its group."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics, checkpoints and the final model."""
        return self.rank == 0

    @classmethod
    def from_config(cls, cfg) -> Runtime:
        """Resolve ``cfg.device`` and ``cfg.teacher_device`` (empty = the student's device); under a
        multi-process launcher (``WORLD_SIZE`` > 1) join the process group first. An ``accelerate launch``
        configured for DeepSpeed is refused; one configured for FSDP is accepted when it maps onto opd's
        sharded student (``opd train fsdp=true``, FSDP version 2, :func:`opd.fsdp.accelerate_fsdp_error`)."""
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise ConfigError(
                f"accelerate launch with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED="
                f"{os.environ['ACCELERATE_USE_DEEPSPEED']}): opd does not run DeepSpeed; launch with a MULTI_GPU "
                "config (distributed_type: MULTI_GPU), an FSDP2 config with opd train fsdp=true, or torchrun"
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            from opd.fsdp import accelerate_fsdp_error

            why = accelerate_fsdp_error(cfg)
            if why is not None:
                raise ConfigError(
                    f"accelerate launch with an FSDP config (ACCELERATE_USE_FSDP={os.environ['ACCELERATE_USE_FSDP']}): "
                    f"{why}; or launch with a MULTI_GPU config (distributed_type: MULTI_GPU) or torchrun"
                )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            if accelerate_started_one_cpu_process():
                log.warning(ACCELERATE_ONE_CPU_PROCESS)
            device = resolve_device(cfg.device, "device")
            teacher = resolve_device(cfg.teacher_device, "teacher_device") if cfg.teacher_device else device
            return cls(device=device, teacher_device=teacher)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device, "device")
        if device.type == "cuda" and cfg.device in ("auto", "cuda"):
            device = torch.device("cuda", local_rank)  # one GPU per process
            torch.cuda.set_device(device)
        if cfg.teacher_device and cfg.teacher_device not in ("auto", "cuda", cfg.device):
            raise ConfigError(
                f"teacher_device={cfg.teacher_device!r} with {world_size} processes: each process keeps its "
                "teacher on its own device; leave teacher_device empty"
            )
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(device=device, teacher_device=device, rank=rank, world_size=world_size, owns_group=owns)

    def describe(self) -> str:
        """One line for the log: where the student and the teacher run."""
        where = (
            f"device {self.device}"
            if self.teacher_device == self.device
            else f"student on {self.device}, teacher on {self.teacher_device}"
        )
        return where if self.world_size == 1 else f"{where}, {self.world_size} processes (rank {self.rank})"

    # ----------------------------------------------------------------- collectives (no-ops in one process)

    def shard(self, items: list) -> list:
        """This process's contiguous share of ``items`` (sizes differ by at most one)."""
        if self.world_size == 1:
            return list(items)
        base, extra = divmod(len(items), self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return list(items[lo : lo + base + (1 if self.rank < extra else 0)])

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum of ``values`` over the processes (float64)."""
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes, in one flat all-reduce. A parameter without
        a gradient on this process (it had no loss tokens) contributes zeros."""
        if self.world_size == 1:
            return
        params = list(params)
        if any(isinstance(p, DTensor) for p in params):
            return  # a sharded student (opd.fsdp): FSDP has already reduce-scattered and summed them
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def reduce_row(
        self,
        row: dict[str, Any],
        *,
        weight: float = 1.0,
        sums: Iterable[str] = (),
        maxima: Iterable[str] = (),
    ) -> dict:
        """One metrics row for all processes: numbers averaged over the processes weighted by ``weight``
        (e.g. this process's response tokens, so token means stay token means), except the keys in
        ``sums`` (summed) and ``maxima`` (max); non-numbers are rank 0's."""
        if self.world_size == 1:
            return row
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = sorted(numeric)
        vals = torch.tensor([float(numeric[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        w = torch.tensor([float(weight)], dtype=torch.float64, device=self._comm_device)
        packed = torch.cat([vals * w, vals, w])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        weighted, total, w_sum = packed[: len(keys)], packed[len(keys) : 2 * len(keys)], packed[-1]
        top = vals.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sums, maxima = set(sums), set(maxima)
        out = dict(row)
        for i, k in enumerate(keys):
            if k == "step":
                continue
            if k in maxima:
                value = top[i].item()
            elif k in sums:
                value = total[i].item()
            else:
                value = (weighted[i] / w_sum).item() if w_sum > 0 else (total[i] / self.world_size).item()
            out[k] = int(value) if isinstance(row[k], int) and k in sums | maxima else float(value)
        return out

    def gather_json(self, value: Any) -> list[Any]:
        """Every process's ``value`` (anything ``json.dumps`` takes), in rank order, on every process:
        sent as UTF-8 bytes in a tensor, so nothing is unpickled."""
        if self.world_size == 1:
            return [value]
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=self._comm_device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self._comm_device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self._comm_device)
        padded[: data.numel()] = data
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [json.loads(bytes(p[: int(n)].tolist()).decode()) for p, n in zip(parts, sizes)]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this runtime joined it (no barrier, so a failed process does not
        wait)."""
        if self.world_size > 1 and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embeddings (where its input ids must go)."""
    embeddings = (
        model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    )
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device
