#!/usr/bin/env bash
# One GPU session: versions, then the named steps, each on its own (a failing step never stops
# the next; every exit status goes to $OUT/status.txt).
# Usage (on the GPU machine, from the repository root):
#   bash benchmarks/gpu_check.sh [tests|layer|set|xmc|profile|profile_tile|bench|mvue|recipe]...
# (no step: tests layer set xmc). Steps:
#   tests         compiled-kernel tests: test_kernels_fanin.py, test_kernels_nm.py and
#                 test_kernels_fanin_tile.py when present
#   layer         benchmarks/kernels.py, all fixed fan-in paths and the torch CSR peer;
#                 its table, the dispatch CSV and the torch peer's JSON lines into $OUT
#   set           benchmarks/set_rewire.py when present (SET_ARGS: its flags)
#   xmc           benchmarks/xmc_trainer.py (XMC_ARGS: its flags, e.g. "--labels 670091 --merge")
#   profile       ncu of the N:M kernels (mask, fused dW)
#   profile_tile  ncu of one fwd+bwd of the fused tile kernel (NCU_KERNELS, default regex:tile;
#                 TILE_SHAPE "L K", default "670091 64"), bf16
#   bench         kernels.py, default flags
#   mvue          benchmarks/mvue_cost.py --sweep: the MVUE mask and fused dW kernels next to the
#                 dW GEMM (MVUE_ARGS: its flags, e.g. "--compare_with .bench_old")
#   recipe        experiments.xmc.ablations (RECIPE_DATA, RECIPE_ROWS, RECIPE_BASE): the XMC
#                 recipe's rows side by side, tables and per-row metrics into $OUT
# Logs and the rewritten BENCHMARKS.md go to $OUT (default ./gpu_out); TAG (default empty) is
# appended to the step's file names, so that a step split over commands keeps every log, e.g.
# TAG=_3m LAYER_ARGS="--outs 3000000". LAYER_ARGS: extra flags of kernels.py. STEP_TIMEOUT
# (seconds, default 580) bounds each step; the scripts write their tables as they go, so a step
# cut short keeps what it measured.
set -uo pipefail
R=$PWD
OUT=${OUT:-$R/gpu_out}; mkdir -p "$OUT"
# The package as `pip install .` lays it out (kernels/ as sparsejax.kernels), into a folder of
# its own: the GPU image has no package index, so no build isolation and no dependencies.
SITE=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE" "$R" \
  || { echo "pip install of $R failed" >&2; exit 1; }
# $SITE first, so that its sparsejax, not the source tree's, is imported; $R for benchmarks/.
export PYTHONPATH=$SITE:$R PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version
  git -C "$R" rev-parse HEAD 2>/dev/null || echo "git: no repository here"
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())" \
    || echo "torch: not importable"
  [ -n "$NCU" ] && "$NCU" --version | tail -1 || echo "ncu: not found"
} 2>&1 | tee "$OUT/versions${TAG:-}.txt"
limit=${STEP_TIMEOUT:-580}; T=${TAG:-}
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests layer set xmc)

run_step() {  # one step; prints and records its exit status
  local step=$1
  echo "=== $step" >&2
  case $step in
    tests) tests=("$R/tests/test_kernels_fanin.py" "$R/tests/test_kernels_nm.py")
           [ -f "$R/tests/test_kernels_fanin_tile.py" ] && tests+=("$R/tests/test_kernels_fanin_tile.py")
           (cd /tmp && SPARSEJAX_TEST_COMPILED=1 timeout "$limit" python3 -m pytest -o pythonpath= \
              -p no:cacheprovider --rootdir="$R" "${tests[@]}" -q 2>&1) > "$OUT/tests_full$T.txt"
           local rc=$?; tail -40 "$OUT/tests_full$T.txt" | tee "$OUT/tests$T.txt"; return $rc ;;
    layer) read -ra layer_args <<< "${LAYER_ARGS:-}"
           timeout "$limit" python3 benchmarks/kernels.py --max_dense_gib 40 \
             --repeats 10 --torch_timeout 240 --dispatch_csv "$OUT/dispatch$T.csv" \
             --torch_jsonl "$OUT/torch_peer$T.jsonl" "${layer_args[@]}" 2>&1 | tee "$OUT/layer$T.txt"
           local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return $rc ;;
    set) if [ ! -f benchmarks/set_rewire.py ]; then echo "benchmarks/set_rewire.py: absent, skipped"
           return 0; fi
         read -ra set_args <<< "${SET_ARGS:-}"
         timeout "$limit" python3 benchmarks/set_rewire.py "${set_args[@]}" 2>&1 | tee "$OUT/set$T.txt"
         local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return $rc ;;
    xmc) read -ra xmc_args <<< "${XMC_ARGS:-}"
         timeout "$limit" python3 benchmarks/xmc_trainer.py "${xmc_args[@]}" 2>&1 | tee "$OUT/xmc$T.txt"
         local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return $rc ;;
    profile) [ -z "$NCU" ] && { echo "ncu: not found"; return 127; }
             timeout "$limit" "$NCU" --set default --section ComputeWorkloadAnalysis \
               --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
               --section InstructionStats \
               -k regex:"mask_kernel|dw_kernel" python3 benchmarks/profile_kernels.py --which nm \
               > "$OUT/ncu_nm.txt" 2>&1
             local rc=$?; tail -5 "$OUT/ncu_nm.txt"; return $rc ;;
    profile_tile) [ -z "$NCU" ] && { echo "ncu: not found"; return 127; }
      read -r tile_out tile_k <<< "${TILE_SHAPE:-670091 64}"
      local script="$OUT/profile_tile.py"
      cat > "$script" <<EOF
# One fwd+bwd of the fused tile kernel (bf16), for ncu.
import jax, jax.numpy as jnp, sparsejax as sj
layer = sj.FixedFanIn.init(768, $tile_out, $tile_k, key=jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (256, 768), jnp.bfloat16)
loss = lambda x, v, i: 0.5 * jnp.sum(
    sj.fixed_fanin_matmul(x, v, i, impl="pallas_tile").astype(jnp.float32) ** 2)
step = jax.jit(jax.grad(loss, argnums=(0, 1)))
jax.block_until_ready(step(x, layer.values.astype(jnp.bfloat16), layer.indices))
print("ran pallas_tile fwd+bwd at L=$tile_out K=$tile_k")
EOF
      timeout "$limit" "$NCU" --set default --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        -k "${NCU_KERNELS:-regex:tile}" python3 "$script" > "$OUT/ncu_tile$T.txt" 2>&1
      local rc=$?; tail -5 "$OUT/ncu_tile$T.txt"; return $rc ;;
    bench) timeout "$limit" python3 benchmarks/kernels.py --max_dense_gib 40 2>&1 | tee "$OUT/bench.txt"
           local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return $rc ;;
    mvue) read -ra mvue_args <<< "${MVUE_ARGS:-}"
          timeout "$limit" python3 benchmarks/mvue_cost.py --sweep "${mvue_args[@]}" 2>&1 \
            | tee "$OUT/mvue_cost$T.txt"
          local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return $rc ;;
    recipe) # The XMC recipe's ablations (experiments.xmc.ablations): RECIPE_DATA (a dataset
            # directory, carried, or synthetic), RECIPE_ROWS, RECIPE_BASE (comma lists). Runs go
            # to /tmp (checkpoints are too large to come back); tables and logs to $OUT.
            local data=${RECIPE_DATA:-synthetic} name runs
            [ "$data" != synthetic ] && data=$(realpath "$data")
            name=${RECIPE_NAME:-$(basename "$data")}; runs=/tmp/ablations/$name
            # From /tmp: `python -m` puts the working directory first on sys.path, and the source
            # tree's sparsejax/ has no kernels/ (the installed one in $SITE has).
            (cd /tmp && timeout "$limit" python3 -m sparsejax.experiments.xmc.ablations \
              --dataset="$data" --rows="${RECIPE_ROWS:-dense,sparse}" \
              --base="${RECIPE_BASE:-}" --output_dir="$runs") 2>&1 | tee "$OUT/recipe_$name$T.txt"
            local rc=${PIPESTATUS[0]}
            cp "$runs"/ablations.md "$OUT/recipe_$name$T.md" 2>/dev/null
            # Every row's metrics.json and epochs.csv in one archive (few files come back).
            (cd "$runs" && tar czf "$OUT/recipe_$name$T.tgz" ablations.* */metrics.json \
              */epochs.csv 2>/dev/null)
            return $rc ;;
    *) echo "unknown step $step"; return 2 ;;
  esac
}

for step in "${steps[@]}"; do
  start=$SECONDS
  run_step "$step"
  rc=$?
  echo "$step$T: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
done
