#!/bin/bash
# The plain-epsilon arm: the copied checkpoint's config was edited to min_snr_gamma: null (resume refuses a
# changed diffusion, rightly, for users; here the change is the experiment).
set -e
cd /work/main/runs/tdep
export OMP_NUM_THREADS=1 PYTHONPATH=/work/scoresrc/src
PY=/work/main/.venv/bin/python
$PY -m dcdit train --resume nosnr/ckpt-0002000 --out nosnr --set train.steps=2250 --set multibudget.enabled=false > log_nosnr.txt 2>&1
$PY -m dcdit flops --ckpt nosnr/ckpt-0002250 --steps 25 --batch-size 100 --per-step --json nosnr.json > nosnr.txt 2>&1
echo done
