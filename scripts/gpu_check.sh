#!/usr/bin/env bash
# GPU checks for the device machine (torch present, no Hydra, no network). Carry .wheels (hydra-core,
# omegaconf, antlr4 wheels from ../shared/wheels) and device_data (a CIFAR-10 subset in
# cifar-10-batches-py layout, made from $NORMBENCH_DATA; never committed). Writes under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD NORMBENCH_DATA=$PWD/device_data NORMBENCH_CACHE=/tmp/nbcache NORMBENCH_NO_DOWNLOAD=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# 1. a real run on the GPU: bf16 autocast, data on the device
python3 -m normbench model=resnet20 norm=bn batch_size=128 epochs=3 out_dir="$OUT/runs" 2>&1 | tail -4
# 2. true small-batch SGD on the GPU (per-step overhead)
python3 -m normbench model=resnet20 norm=gn batch_size=2 epochs=1 data.subset=2000 out_dir="$OUT/runs" 2>&1 | tail -2
python3 -m normbench model=resnet20 norm=bn batch_size=8 norm.virtual_batch=2 epochs=1 data.subset=4000 out_dir="$OUT/runs" 2>&1 | tail -2
# 3. a small sweep with a crash-free report
python3 -m normbench -m model=cnn norm=bn,gn,brn batch_size=8,128 epochs=1 data.subset=4000 out_dir="$OUT/sweep" report_at_end=true 2>&1 | tail -12
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).rglob("summary.json")):
    s = json.loads(p.read_text())
    print(f"{s['run_name']:40s} {s['status']:9s} dev={s.get('device')} test_acc={s.get('test_acc')} img/s={s.get('images_per_s')}")
PY
# 4. throughput: every norm vs BN, ghost vs true batch 2, runner vs pure compute and DataLoader, compile=true vs
# eager (the bench's GPU sections; its windows fit the carried 10,000-image subset)
python3 scripts/bench.py --norms all --models resnet20 --workers 8 --out "$OUT/gpu_bench.md" 2>&1 | tail -30
