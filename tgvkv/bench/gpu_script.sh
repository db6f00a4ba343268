#!/usr/bin/env bash
# What a lent GPU machine runs (device tool): 7B-shaped LLaVA-NeXT, fp16, random weights, batch 1/4/16, ~2.9k prompt
# tokens; plus the prefill-overhead sweep with the 7B LM shape. Results land in results/bench/gpu (or $OUT).
set -euo pipefail
export HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m tgvkv.bench gpu --out "${OUT:-results/bench/gpu}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
