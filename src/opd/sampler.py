"""Which prompts a training step uses: :class:`PromptSampler`, deterministic epoch-wise shuffles of a
prompt set, resumable at the exact data position."""

from __future__ import annotations

import random
from collections.abc import Sized


class PromptSampler:
    """Deterministic epoch-wise shuffled prompt indices, resumable at the exact data position.

    Epoch ``e`` visits every index once, in the permutation drawn from ``random.Random`` seeded with
    ``(seed, e)``; a batch that runs past the end of an epoch continues into the next one. The state is
    ``(epoch, position)``, so ``load_state_dict(state_dict())`` on a fresh sampler with the same data
    size and seed reproduces every later batch.
    """

    def __init__(self, prompt_set: Sized, seed: int = 0):
        self.size = len(prompt_set)
        if self.size == 0:
            raise ValueError("PromptSampler: the prompt set is empty; load at least one prompt")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.size))
        random.Random(f"opd-prompt-sampler:{self.seed}:{epoch}").shuffle(perm)
        return perm

    def next_batch(self, n: int) -> list[int]:
        """The next ``n`` prompt indices (crossing into the next epoch when this one runs out)."""
        if n <= 0:
            raise ValueError(f"next_batch(n={n}): n must be a positive number of prompts")
        out: list[int] = []
        while len(out) < n:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), self.size - self.position)
            out.extend(self._perm[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler.load_state_dict: checkpoint has {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same prompt data and data seed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.size:
            raise ValueError(
                f"PromptSampler.load_state_dict: epoch={epoch}, position={position} out of range for "
                f"{self.size} prompts"
            )
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)
