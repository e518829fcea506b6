#!/usr/bin/env bash
# Run an aft-jax command on every worker of a Cloud TPU VM (or queued resource), streaming the logs.
#
#   launch/tpu_run.sh --name NAME --zone ZONE --accelerator TYPE [options] -- aft-jax COMMAND ARGS...
#
# Steps: create the TPU (or reuse it if it exists), copy this checkout to every worker, set up a virtual
# environment there (pip install -e . and jax[tpu]), run the command on all workers at once, then delete
# the TPU (unless --keep). --dry-run prints every gcloud command instead of running it.
#
# Options:
#   --name NAME            TPU (and queued resource) name                      (required)
#   --zone ZONE            e.g. us-central2-b (v4), us-west4-a (v5e)            (required)
#   --accelerator TYPE     e.g. v4-32, v5litepod-64, v5p-64                     (required)
#   --version VERSION      TPU software version (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite)
#   --project PROJECT      gcloud project (default: gcloud's configured one)
#   --queued               create through a queued resource (waits until it is ACTIVE)
#   --spot                 spot capacity
#   --keep                 do not delete the TPU at the end
#   --dry-run              print the gcloud commands, run nothing
#
# Examples (see docs/tpu.md):
#   launch/tpu_run.sh --name aft-v4 --zone us-central2-b --accelerator v4-32 -- \
#       aft-jax pipeline --config configs/llama2_7b_gsm8k.py --config.run_dir=gs://BUCKET/llama2_7b_gsm8k
#   launch/tpu_run.sh --name aft-v5e --zone us-west4-a --accelerator v5litepod-64 --version v2-alpha-tpuv5-lite \
#       --queued --spot -- aft-jax pipeline --config configs/llama2_7b_gsm8k.py
set -euo pipefail

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project="" queued=0 spot=0 keep=0 dry_run=0
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_run.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$accelerator" ] || { echo "tpu_run.sh: --name, --zone and --accelerator are required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_run.sh: give the command to run after --, e.g. -- aft-jax pipeline --config ..." >&2; exit 2; }
[ "$1" = "aft-jax" ] || { echo "tpu_run.sh: the command must start with aft-jax, got $1" >&2; exit 2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
common=(--zone "$zone")
[ -n "$project" ] && common+=(--project "$project")
remote_cmd="$(printf '%q ' "$@")"

run() {  # print in dry-run mode, run otherwise
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

tpu_exists() {
  [ "$dry_run" = 0 ] && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1
}

cleanup() {
  [ "$keep" = 1 ] && return
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

if tpu_exists; then
  echo "reusing TPU $name" >&2
else
  spot_flag=(); [ "$spot" = 1 ] && spot_flag=(--spot)
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources create "$name" --node-id "$name" "${common[@]}" \
      --accelerator-type "$accelerator" --runtime-version "$version" "${spot_flag[@]}"
    if [ "$dry_run" = 0 ]; then
      until gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)' | grep -q ACTIVE; do
        echo "waiting for queued resource $name ..." >&2; sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator" \
      --version "$version" "${spot_flag[@]}"
  fi
fi
trap cleanup EXIT

archive="/tmp/aft_jax-$name.tar.gz"
run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:aft_jax.tar.gz" "${common[@]}" --worker=all
setup='rm -rf aft_jax && mkdir aft_jax && tar xzf aft_jax.tar.gz -C aft_jax && cd aft_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . "jax[tpu]"'
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$setup"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
  --command "cd aft_jax && AFT_DISTRIBUTED=auto PATH=\$PWD/.venv/bin:\$PATH $remote_cmd"
