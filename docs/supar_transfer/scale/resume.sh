#!/bin/bash
# Resumes the width-512 sweep of this folder on the code it began with (commit 2e5d1fc;
# RESULTS.md, "At scale", says why). Two steps:
#   here, in the repository root:  bash docs/supar_transfer/scale/resume.sh build
#     (a wheel of commit 2e5d1fc in .whl_supar_scale/, which git ignores via .git/info/exclude)
#   on the GPU machine, same root: bash docs/supar_transfer/scale/resume.sh run CALL_SECONDS
#     (carry .whl_supar_scale). The output folder /tmp/supar_scale lives on while the machine
#     stays warm, so back-to-back calls each resume where the last stopped; a fresh machine
#     starts from the committed runs.csv. $OUT/results.tgz holds the runs so far, $OUT/log.txt
#     the call's log.
set -o pipefail
HERE=docs/supar_transfer/scale
WHEELS=.whl_supar_scale
case "$1" in
build)
  grep -qx "/$WHEELS/" .git/info/exclude || echo "/$WHEELS/" >> .git/info/exclude
  rm -rf "$WHEELS" /tmp/supar_scale_src && mkdir -p /tmp/supar_scale_src
  git archive 2e5d1fc setup.py sparsejax kernels experiments README.md | tar x -C /tmp/supar_scale_src
  python3 -m pip wheel -q --no-deps -w "$WHEELS" /tmp/supar_scale_src ;;
run)
  export PYTHONUNBUFFERED=1 XLA_FLAGS=--xla_gpu_autotune_level=0
  if [ ! -d /tmp/supar_scale_site/sparsejax ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/supar_scale_site "$WHEELS"/*.whl || exit 1
  fi
  O=/tmp/supar_scale/scale
  if [ ! -f $O/runs.csv ]; then
    mkdir -p $O && cp $HERE/runs.csv $HERE/config.json $O/
  fi
  # The sweep starts a 7-run group only if it fits what is left of this budget.
  budget=$(( $2 - SECONDS - 30 ))
  echo "budget $budget s; $(nvidia-smi --query-gpu=name --format=csv,noheader); $(date -u)"
  # From /tmp, so the installed 2e5d1fc package is imported, not this checkout.
  (cd /tmp && PYTHONPATH=/tmp/supar_scale_site python3 -m sparsejax.experiments.supar.sweep \
    --width 512 --base_width 128 --heads 4 --context 256 --batch 16 --steps 2000 --warmup 200 \
    --layer fixed_fanin --densities 1,1/8,1/32,1/128 --parameterizations supar,sp,mup \
    --proxy_log2_lrs=-9,-8,-7,-6,-5,-4,-3 --proxy_alpha_in 1,4,16 --lr_steps=-2,-1,0,1,2,3,4 \
    --seeds 3 --train_bytes 100000000 --coord_steps 0 --dtype bfloat16 \
    --output_dir $O --models_per_call 7 --time_budget_s $budget) 2>&1 | tee "$OUT/log.txt"
  tar czf "$OUT/results.tgz" -C /tmp/supar_scale scale ;;
*)
  echo "usage: $0 build | run CALL_SECONDS" >&2; exit 2 ;;
esac
