#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its VM.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
YES=0

usage() {
  cat <<EOF
Usage: launch/delete.sh [flags]

Deletes the TPU VM NAME (gcloud asks to confirm unless --yes). Results in the bucket stay.

  --queued                delete the queued resource NAME and its VM (--force --async)
  --yes                   do not ask for confirmation
EOF
  common_help name zone project
}

script_flag() {
  case "$1" in
    --queued) QUEUED=1 ;;
    --yes|-y) YES=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require NAME ZONE
quiet=()
if [[ $YES == 1 ]]; then quiet=(--quiet); fi

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${TPU_FLAGS[@]}" --force --async ${quiet[@]+"${quiet[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${TPU_FLAGS[@]}" ${quiet[@]+"${quiet[@]}"}
fi
