#!/usr/bin/env bash
# Device call 2 (issue 8's stem measurement): ResNet-18 at 28px with the CIFAR stem, then the ImageNet
# stem, scratch and mm-PT fine-tuning, 100 episodes, on the four 2D targets, each pretrained on the
# other three (the default profile; only model.stem differs). Usage: run.sh CIFAR_SECONDS IMAGENET_SECONDS.
# Ran as `bash run.sh 330 190` with the stores of retina, breast and blood carried in .device/root/store
# and organa staged on the machine in the call before (docs/results/gpu/stage_and_benchmark.sh) (four stores are over one call's 64 MiB).
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD MEDMETA_ROOT=$PWD/.device/root
store=.device/root/store
[ -f $store/organamnist_28.h5 ] || cp /tmp/st/organamnist_28.h5 $store/ || { echo "organa not staged"; exit 3; }
ls $store
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
declare -A limits=([cifar]=$1 [imagenet]=$2)
for stem in cifar imagenet; do
  start=$(date +%s)
  timeout ${limits[$stem]} python3 experiments/cdfsl.py --target retina,breast,blood,organa --sources available \
    --set model.stem=$stem --out /tmp/$stem ${EXTRA:-} > $OUT/$stem.log 2>&1
  echo "$stem rc=$? wall=$(( $(date +%s) - start ))s"
  tar czf $OUT/$stem.tgz --exclude='*.pt' --exclude='events.*' -C /tmp $stem
  grep -v $'\r' $OUT/$stem.log | grep -v '^\s*$' | tail -12 | cut -c1-250
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
