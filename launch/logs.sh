#!/usr/bin/env bash
# Follow a run's log on a TPU VM worker.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN="${ROUTING_LM_RUN:-}"
WORKER=0
LINES=100
FOLLOW=1

usage() {
  cat <<EOF
Usage: launch/logs.sh [flags]

Shows ~/routing_lm_logs/RUN.log on a worker (default: the newest log there) and keeps
following it (Ctrl-C stops following; the run goes on).

  --run RUN               the run (train.sh) or RUN-<i> (sweep.sh point i) (ROUTING_LM_RUN)
  --worker N|all          which worker (default 0, the one that logs metrics)
  --lines N               lines of history to show (default 100)
  --no-follow             print and exit
  --list                  list the logs on the worker
EOF
  common_help name zone project
}

LIST=0
script_flag() {
  case "$1" in
    --run) need_value "$@"; RUN="$2"; SHIFT=2 ;;
    --worker) need_value "$@"; WORKER="$2"; SHIFT=2 ;;
    --lines) need_value "$@"; LINES="$2"; SHIFT=2 ;;
    --no-follow) FOLLOW=0 ;;
    --list) LIST=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require NAME ZONE
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or 'all'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number"

if [[ $LIST == 1 ]]; then
  remote "$WORKER" "ls -lt $REMOTE_LOGS"
  exit 0
fi
if [[ -n $RUN ]]; then
  check_name --run "$RUN"
  file="$REMOTE_LOGS/$RUN.log"
else
  # shellcheck disable=SC2016  # expands on the worker
  file='"$(ls -t '"$REMOTE_LOGS"'/*.log | head -n 1)"'
fi
tail_flags="-n $LINES"
if [[ $FOLLOW == 1 ]]; then tail_flags+=" -F"; fi
remote "$WORKER" "f=$file && echo \"== \$f\" && tail $tail_flags \"\$f\""
