#!/usr/bin/env bash
# Issue 19's GPU check, about 2 minutes on one CUDA GPU: `torchrun --nproc_per_node 1 train.py` (the NCCL path:
# process group, summed gradients, reduced validation) against plain `python train.py` with the same arguments,
# on a random GPT-2 of 124M's shape and random documents made here (no network, no tokenizer files needed).
# Prints each run's time per step, the two checkpoints' largest adapter difference, and eval.py reading the
# torchrun checkpoint.     bash gpu_check_19.sh [work folder; default: a new temp folder]
set -euo pipefail
cd "$(dirname "$0")"
work="${1:-$(mktemp -d)}"
echo "work folder: $work"

python3 - "$work" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from gpt2 import GPT, GPTConfig

work = Path(sys.argv[1])
GPT(GPTConfig()).save_pretrained(work / "gpt2-random")  # 124M's shape, GPT-2's init, Hugging Face's layout
rng, tasks = np.random.default_rng(0), ["a", "b", "c"]
counts = {}
for split, per_task in (("train", 640), ("val", 64), ("test", 64)):
    docs = [(t, np.append(rng.integers(0, 50256, rng.integers(64, 320)), 50256)) for t in range(3) for _ in range(per_task)]
    (work / "data" / split).mkdir(parents=True)
    arrays = dict(tokens=np.concatenate([d for _, d in docs]).astype(np.uint16),
                  offsets=np.cumsum([0] + [len(d) for _, d in docs]).astype(np.int64),
                  task_ids=np.array([t for t, _ in docs], dtype=np.int64), prompt_lens=np.zeros(len(docs), dtype=np.int64))
    for name, array in arrays.items():
        np.save(work / "data" / split / f"{name}.npy", array)
    counts[split] = {task: {"docs": per_task, "tokens": int(sum(len(d) for t, d in docs if t == i))}
                     for i, task in enumerate(tasks)}
meta = {"format": "bora-gpt2-data/2", "encoding": "gpt2", "tasks": tasks, "task_prompt": False, "counts": counts,
        "fingerprint": "random-documents"}
(work / "data" / "meta.json").write_text(json.dumps(meta))
EOF

args=(--data "$work/data" --init "$work/gpt2-random" --tau 100 --max-epochs 1 --batch-size 64 --block-size 256)
python3 train.py "${args[@]}" --out "$work/one" | tee "$work/one.txt"
python3 -m torch.distributed.run --nproc_per_node 1 train.py "${args[@]}" --out "$work/ddp" | tee "$work/ddp.txt"

echo "---- python train.py vs torchrun --nproc_per_node 1 (seconds per step: after 3 steps; over the epoch)"
for run in one ddp; do
  echo "$run: $(grep -o '"seconds_per_step": [0-9.e-]*' "$work/$run/log.jsonl") | $(grep -o '[0-9.]* s/step' "$work/$run.txt" | tail -1)"
done
grep -q "cuda:0, rank 0 of 1 (torchrun)" "$work/ddp.txt" && echo "torchrun ran on cuda:0 in a process group (NCCL)"
python3 - "$work" <<'EOF'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{run}/ckpt.pt", weights_only=True) for run in ("one", "ddp"))
worst = max(((a["adapters"][k] - b["adapters"][k]).norm() / a["adapters"][k].norm()).item() for k in a["adapters"])
print(f"largest relative adapter difference: {worst:.2e}; best epochs {a['epoch']} and {b['epoch']}; "
      f"validation ll {a['val']['ll_task_avg']:.6f} and {b['val']['ll_task_avg']:.6f}")
EOF
python3 eval.py "$work/ddp/ckpt.pt" --split val
