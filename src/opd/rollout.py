"""Rollout backends: sample student responses for prompts.

CONTRACT (implemented by the rollout helper):

``RolloutBatch`` layout, B = len(prompts) · n, rows ordered prompt-major (row = p·n + g):
``[left padding | prompt tokens | response tokens | right padding]``; all prompts end at the same
column ``prompt_len`` (left-padded), so ``response_mask_B_T[:, :prompt_len] == 0``. The response
includes the stop token (EOS / end-of-turn) when one was generated; tokens after it are padding with
attention 0 and response mask 0. ``truncated_B`` is True when no stop token was produced within
``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    input_ids_B_T: torch.Tensor  # long
    attention_mask_B_T: torch.Tensor  # long 0/1
    response_mask_B_T: torch.Tensor  # float 0/1
    prompt_len: int
    prompt_index_B: torch.Tensor  # long: index into the prompt list
    truncated_B: torch.Tensor  # bool

    @property
    def response_lengths_B(self) -> torch.Tensor:
        return self.response_mask_B_T.sum(-1).long()

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """Rows of this batch (micro-batching)."""
        return RolloutBatch(
            self.input_ids_B_T[rows],
            self.attention_mask_B_T[rows],
            self.response_mask_B_T[rows],
            self.prompt_len,
            self.prompt_index_B[rows],
            self.truncated_B[rows],
        )
