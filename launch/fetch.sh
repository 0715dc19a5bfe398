#!/usr/bin/env bash
# Copy a run's or a sweep's results from GCS to this machine.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN="${ROUTING_LM_RUN:-}"
SWEEP="${ROUTING_LM_SWEEP:-}"
DEST="${ROUTING_LM_DEST:-$ROOT/results}"
CHECKPOINTS=0

usage() {
  cat <<EOF
Usage: launch/fetch.sh [flags]

Copies gs://BUCKET/runs/RUN (or gs://BUCKET/sweeps/SWEEP) to DEST/runs/RUN (DEST/sweeps/
SWEEP): summary.json, metrics.jsonl, TensorBoard events, a sweep's results.csv, with
gcloud storage rsync, so fetching again copies only what changed. Checkpoints stay in
GCS unless --checkpoints.

  --run RUN               a train.sh run (ROUTING_LM_RUN)
  --sweep SWEEP           a sweep (its name, or its configs/sweeps/ file) (ROUTING_LM_SWEEP)
  --dest DIR              local directory (default: results/ in this checkout) (ROUTING_LM_DEST)
  --checkpoints           copy checkpoints/ too (large)
EOF
  common_help bucket
}

script_flag() {
  case "$1" in
    --run) need_value "$@"; RUN="$2"; SHIFT=2 ;;
    --sweep) need_value "$@"; SWEEP="$2"; SHIFT=2 ;;
    --dest) need_value "$@"; DEST="$2"; SHIFT=2 ;;
    --checkpoints) CHECKPOINTS=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require BUCKET
if [[ -n $RUN && -z $SWEEP ]]; then
  path="runs/$RUN"
elif [[ -n $SWEEP && -z $RUN ]]; then
  path="sweeps/$(slug "$SWEEP")"
else
  die "pass one of --run (ROUTING_LM_RUN) or --sweep (ROUTING_LM_SWEEP)"
fi
check_name "the run" "${path#*/}"

exclude=()
if [[ $CHECKPOINTS == 0 ]]; then exclude=("--exclude=^(.*/)?checkpoints/.*"); fi
run mkdir -p "$DEST/$path"
run gcloud storage rsync --recursive ${exclude[@]+"${exclude[@]}"} "gs://$BUCKET/$path" "$DEST/$path"
