#!/usr/bin/env bash
# The GPU check (≤ 5 minutes on one H100-class GPU): OPD in bf16 with fp32 masters on SmolLM2-135M and
# a 12-layer student, one process, then 2-process data parallel when two GPUs are visible; the memory
# model of one step on the GPU; opd train fsdp=true and bare FSDP2 with NCCL when two GPUs are visible.
#   bash benchmarks/gpu_check.sh            (from the repository root, in the project's venv)
set -euo pipefail
DIR="${OPD_GPU_DIR:-/tmp/opd-gpu}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name(0))"
python benchmarks/gpu_check.py prepare --dir "$DIR"
python benchmarks/gpu_check.py run --dir "$DIR" --steps 6
if python -c "import vllm" 2>/dev/null; then  # the vLLM rollout backend, when installed (docs/scaling.md)
  python benchmarks/gpu_check.py run --dir "$DIR" --steps 6 --rollout-backend vllm
else
  echo "vllm not installed: the rollout_backend=vllm check is skipped"
fi
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  torchrun --standalone --nproc_per_node 2 benchmarks/gpu_check.py run --dir "$DIR" --steps 6
  # the same with the student sharded (opd train fsdp=true): FSDP2 over NCCL
  torchrun --standalone --nproc_per_node 2 benchmarks/gpu_check.py run --dir "$DIR" --steps 6 --fsdp
else
  echo "one GPU: the 2-process data-parallel and fsdp=true checks are skipped"
fi
# what each part of a step costs in GPU memory (the table of docs/scaling.md, measured on the CPU there)
python benchmarks/memory_model.py run --dir "$DIR" --device cuda
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  # bare FSDP2 with NCCL: 2-process gradients and weights against one process
  torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_check.py --device cuda
fi
