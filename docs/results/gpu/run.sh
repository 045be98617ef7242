#!/usr/bin/env bash
# Device run 2: the GPU benchmark, then the paper profile shortened (retina <- breast, 28px) under torchrun.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD MEDMETA_ROOT=$PWD/.device/root
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 200 python3 benchmarks/gpu.py --keep-going --json $OUT/gpu.json > $OUT/gpu.txt 2>&1; echo gpu_rc=$?
grep -v $'\r' $OUT/gpu.txt | cut -c1-200 | tail -45
start=$(date +%s)
timeout 270 python3 -m torch.distributed.run --nproc_per_node 1 experiments/cdfsl.py --target retina --sources breast \
  --config paper --size 28 --methods scratch,mmpt,maml --set pretrain.steps=3000 --set maml.steps=100 \
  --set maml.checkpoint_every=50 --out /tmp/paper > $OUT/paper.log 2>&1; echo paper_rc=$? wall=$(( $(date +%s) - start ))s
cp /tmp/paper/results.json $OUT/paper_results.json 2>/dev/null
for f in /tmp/paper/pretrained/*/training.json; do cp $f $OUT/$(basename $(dirname $f)).json; done 2>/dev/null
grep -v $'\r' $OUT/paper.log | grep -v "^\s" | tail -8 | cut -c1-300
python3 - <<'PY' 2>/dev/null
import json; r = json.load(open("/tmp/paper/results.json"))
for name, m in r["methods"].items(): print(name, {k: round(v, 1) for k, v in m["seconds"].items()})
PY
