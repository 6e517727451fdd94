"""The names each objective accepts, and the input checks every objective runs at entry.

Every error names the argument, the value seen and the fix.
"""

from __future__ import annotations

import torch

SUPPORTS = ("student", "teacher", "intersection", "union", "symmetric_difference")
WEIGHTINGS = ("student_p", "teacher_p", "uniform")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
ESTIMATORS = ("k1", "k3")

# Names used by the reference code, mapped to ours; only used to make error messages say the fix.
_REFERENCE_NAMES = {
    "only_stu": "student",
    "only_tch": "teacher",
    "union-intersection": "symmetric_difference",
    "none": "uniform",
}


def check_choice(arg: str, value: str, choices: tuple[str, ...]) -> None:
    if value in choices:
        return
    hint = ""
    if value in _REFERENCE_NAMES and _REFERENCE_NAMES[value] in choices:
        hint = f" ({value!r} is the reference code's name for {_REFERENCE_NAMES[value]!r})"
    raise ValueError(f"{arg}={value!r} is not supported{hint}; use one of {choices}.")


def check_rank(arg: str, tensor: torch.Tensor, axes: str) -> None:
    rank = len(axes.split("_"))
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor with axes {axes}, got {type(tensor).__name__}.")
    if tensor.dim() != rank:
        raise ValueError(
            f"{arg} must have rank {rank} (axes {axes}) but has shape {tuple(tensor.shape)}; "
            f"pass a tensor shaped [{', '.join(axes.split('_'))}]."
        )


def check_shape(arg: str, tensor: torch.Tensor, shape: tuple[int, ...], like: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{arg} has shape {tuple(tensor.shape)} but must match {like} with shape {tuple(shape)}; "
            "pass tensors computed on the same batch, positions and support."
        )


def check_mask(mask_B_T: torch.Tensor, shape_B_T: tuple[int, ...], like: str) -> torch.Tensor:
    check_rank("mask_B_T", mask_B_T, "B_T")
    check_shape("mask_B_T", mask_B_T, shape_B_T, f"the first two axes of {like}")
    return mask_B_T != 0


def check_floating(arg: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{arg} must be a floating-point tensor, got dtype {tensor.dtype}; pass log-probs.")


def fill_invalid_rows_safe(x_B_T_S: torch.Tensor, valid_B_T_S: torch.Tensor) -> torch.Tensor:
    """``x`` with invalid entries at −inf, except rows with no valid entry, which become all 0.

    Feeding the result to softmax / logsumexp never produces NaN values or NaN gradients: a row of only
    −inf would (``exp(−inf − (−inf))``); callers zero those rows afterwards.
    """
    any_valid_B_T_1 = valid_B_T_S.any(dim=-1, keepdim=True)
    x_B_T_S = x_B_T_S.masked_fill(~valid_B_T_S, float("-inf"))
    return torch.where(any_valid_B_T_1, x_B_T_S, torch.zeros_like(x_B_T_S))
