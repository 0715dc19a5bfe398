#!/usr/bin/env bash
# Create a TPU VM, or a queued resource that becomes one when capacity frees up.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
TIER=""   # --spot | --reserved

usage() {
  cat <<EOF
Usage: launch/create.sh [flags] [-- extra gcloud create flags]

Create the TPU VM NAME (or, with --queued, the queued resource NAME whose node is NAME).

  --queued                create a queued resource instead of the VM directly
  --spot                  spot capacity (cheaper, can be preempted)
  --reserved              use the project's reservation
EOF
  common_help name zone accelerator-type runtime-version project
  cat <<EOF

Example:
  launch/create.sh --name my-tpu --zone us-west4-a --accelerator-type v5litepod-8
EOF
}

script_flag() {
  case "$1" in
    --queued) QUEUED=1 ;;
    --spot|--reserved) TIER="$1" ;;
    *) return 1 ;;
  esac
}

# The runtime (software) version Google documents for each TPU family.
default_runtime_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version (or set ROUTING_LM_RUNTIME_VERSION)" ;;
  esac
}

parse_args "$@"
require NAME ZONE ACCELERATOR_TYPE
check_name --name "$NAME"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")"
fi

args=("${TPU_FLAGS[@]}" "--accelerator-type=$ACCELERATOR_TYPE")
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${args[@]}" \
    --runtime-version="$RUNTIME_VERSION" ${TIER:+"$TIER"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  note "Queued. The VM exists once the state is ACTIVE:"
  note "  gcloud compute tpus queued-resources describe $NAME ${TPU_FLAGS[*]} --format='value(state.state)'"
else
  run gcloud compute tpus tpu-vm create "$NAME" "${args[@]}" \
    --version="$RUNTIME_VERSION" ${TIER:+"$TIER"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
fi
note "Next: launch/install.sh --name $NAME ${TPU_FLAGS[*]}"
