#!/usr/bin/env bash
# Issue 18 on a GPU, about a minute on one H200: bench.py's tables on CUDA, peak GPU memory per variant.
#   - training step 8 x 256: the head in chunks vs the batch's logits at once (same loss, peak MB);
#   - the corpus of varied length: positions per scored token, s/step and min/epoch, padded vs sorted passes;
#   - generation of 200 tokens: KV cache vs the uncached loop vs transformers' generate (tokens/s, same tokens).
set -euo pipefail
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 300 python bench.py --device cuda --steps 5 --new-tokens 200
