#!/usr/bin/env bash
# Start one config on every worker of a TPU VM, detached from the ssh session.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="${ROUTING_LM_CONFIG:-}"
RUN="${ROUTING_LM_RUN:-}"
WORKDIR="${ROUTING_LM_WORKDIR:-}"

usage() {
  cat <<EOF
Usage: launch/train.sh [flags] [-- more routing_lm.main flags]

On every worker (--worker=all), in the background (nohup; it survives the ssh session):
  python -m routing_lm.main --config=CONFIG --workdir=gs://BUCKET/runs/RUN [more flags]
appending its output to ~/routing_lm_logs/RUN.log on each worker (see launch/logs.sh).
Running the same RUN again resumes from its latest checkpoint in the workdir.

  --config FILE[:ARG]     e.g. configs/paper.py:130m,sbase,64 (ROUTING_LM_CONFIG)
  --run RUN               run name (default from the config: paper-130m-sbase-64) (ROUTING_LM_RUN)
  --workdir gs://...      instead of gs://BUCKET/runs/RUN (ROUTING_LM_WORKDIR)
EOF
  common_help name zone bucket project
  cat <<EOF

Example:
  launch/train.sh --name my-tpu --zone us-west4-a --bucket my-bucket \\
    --config configs/paper.py:130m,sbase,64 -- --config.train.num_steps=20000
EOF
}

script_flag() {
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; SHIFT=2 ;;
    --run) need_value "$@"; RUN="$2"; SHIFT=2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require NAME ZONE CONFIG
RUN="${RUN:-$(slug "$CONFIG")}"
check_name --run "$RUN"
if [[ -z $WORKDIR ]]; then
  require BUCKET
  WORKDIR="$(workdir_url runs "$RUN")"
fi
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path: every worker reads and writes it"
[[ -f "$ROOT/${CONFIG%%:*}" ]] || warn "no ${CONFIG%%:*} in this checkout"

cmd="python -m routing_lm.main --config=$(shquote "$CONFIG") --workdir=$(shquote "$WORKDIR")"
for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
  cmd+=" $(shquote "$arg")"
done
log="$REMOTE_LOGS/$RUN.log"
remote all "$(remote_prelude) && { nohup $cmd >> $log 2>&1 < /dev/null & }"
note "Started $RUN on every worker of $NAME; workdir $WORKDIR"
note "Follow: launch/logs.sh --name $NAME ${TPU_FLAGS[*]} --run $RUN"
