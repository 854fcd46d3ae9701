#!/usr/bin/env bash
# GPU check for a lent GPU machine: bf16 training throughput and MFU, faiss-gpu build and
# search, a 1M-vector embed; prints one table (every row says "skipped (why)" on CPU).
#   scripts/gpu_check.sh [--model BUNDLE] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'faiss', faiss.__version__, 'faiss gpus', faiss.get_num_gpus())"
exec python scripts/gpu_check.py "$@"
