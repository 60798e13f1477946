#!/bin/bash
# Does the Min-SNR cap flatten the router's t-profile? Continue the eps@2000 MNIST DC-DiT 250 steps
# with Min-SNR-5 (control) and with DiT's plain epsilon MSE, multi-budget off in both; then the kept
# share against t over a DDIM-25 sampling run of 100 images.
set -e
cd /work/main/runs/tdep
export OMP_NUM_THREADS=1 PYTHONPATH=/work/scoresrc/src
PY=/work/main/.venv/bin/python
$PY -m dcdit flops --ckpt snr5/ckpt-0002000 --steps 25 --batch-size 100 --per-step --json start.json > start.txt 2>&1
for v in snr5 nosnr; do
  extra=""; [ $v = nosnr ] && extra="--set diffusion.min_snr_gamma=null"
  $PY -m dcdit train --resume $v/ckpt-0002000 --out $v --set train.steps=2250 --set multibudget.enabled=false --set train.ckpt_interval=250 $extra > log_$v.txt 2>&1
  $PY -m dcdit flops --ckpt $v/ckpt-0002250 --steps 25 --batch-size 100 --per-step --json $v.json > $v.txt 2>&1
done
echo done
