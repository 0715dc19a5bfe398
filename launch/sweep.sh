#!/usr/bin/env bash
# Run a sweep's grid points on every worker of a TPU VM, one point after another.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SWEEP="${ROUTING_LM_SWEEP:-}"
COMMANDS_FILE="${ROUTING_LM_COMMANDS_FILE:-}"
RUN="${ROUTING_LM_RUN:-}"
WORKDIR="${ROUTING_LM_WORKDIR:-}"
PYTHON="${ROUTING_LM_PYTHON:-python3}"
NUM_DEVICES="${ROUTING_LM_NUM_DEVICES:-}"
DETACH=0

usage() {
  cat <<EOF
Usage: launch/sweep.sh [flags]

Expands the sweep here (this checkout, with routing_lm installed):
  $PYTHON -m routing_lm.sweep --sweep=FILE --workdir=gs://BUCKET/sweeps/RUN --print-commands
(that runs locally, also with --dry-run), then runs each printed command on every worker
(--worker=all) in turn, waiting for each; point i's output goes to
~/routing_lm_logs/RUN-<i>.log on each worker. With --detach, one ssh starts the whole
sequence under nohup on the workers and returns.

  --sweep FILE            e.g. configs/sweeps/cpu.py (ROUTING_LM_SWEEP)
  --commands-file FILE    take the commands from FILE ('-': stdin) instead (ROUTING_LM_COMMANDS_FILE)
  --run RUN               sweep name for logs and workdir (default from the file) (ROUTING_LM_RUN)
  --workdir gs://...      instead of gs://BUCKET/sweeps/RUN (ROUTING_LM_WORKDIR)
  --num-devices N         devices in the slice, to check each point's mesh against
                          (default: this machine's) (ROUTING_LM_NUM_DEVICES)
  --detach                start all points in the background on the workers and return
  Python for the expansion: \$ROUTING_LM_PYTHON (default python3)
EOF
  common_help name zone bucket project
}

script_flag() {
  case "$1" in
    --sweep) need_value "$@"; SWEEP="$2"; SHIFT=2 ;;
    --commands-file) need_value "$@"; COMMANDS_FILE="$2"; SHIFT=2 ;;
    --run) need_value "$@"; RUN="$2"; SHIFT=2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; SHIFT=2 ;;
    --num-devices) need_value "$@"; NUM_DEVICES="$2"; SHIFT=2 ;;
    --detach) DETACH=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require NAME ZONE
if [[ -n $COMMANDS_FILE ]]; then
  RUN="${RUN:-$(slug "$COMMANDS_FILE")}"
  check_name --run "$RUN"
  commands="$(cat -- "$COMMANDS_FILE")"
else
  require SWEEP
  RUN="${RUN:-$(slug "$SWEEP")}"
  check_name --run "$RUN"
  if [[ -z $WORKDIR ]]; then
    require BUCKET
    WORKDIR="$(workdir_url sweeps "$RUN")"
  fi
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path: every worker reads and writes it"
  expand=("$PYTHON" -m routing_lm.sweep --sweep="$SWEEP" --workdir="$WORKDIR" --print-commands)
  if [[ -n $NUM_DEVICES ]]; then expand+=(--num_devices="$NUM_DEVICES"); fi
  show "${expand[@]}" >&2
  commands="$(cd "$ROOT" && "${expand[@]}")" || die "could not expand $SWEEP (is routing_lm installed here?)"
fi

points=()
while IFS= read -r line; do
  if [[ -n ${line// /} && $line != \#* ]]; then points+=("$line"); fi
done <<< "$commands"
n=${#points[@]}
[[ $n -gt 0 ]] || die "the sweep printed no commands"

logfile() { echo "$REMOTE_LOGS/$RUN-$(printf %03d "$1").log"; }

if [[ $DETACH == 1 ]]; then
  script="$(remote_prelude) || exit 1"
  for ((i = 0; i < n; i++)); do
    script+="; echo $(shquote "point $((i + 1))/$n: ${points[i]}")"
    script+="; { ${points[i]}; } >> $(logfile "$i") 2>&1 || echo \"point $((i + 1)) failed: exit \$?\""
  done
  remote all "mkdir -p $REMOTE_LOGS && { nohup bash -c $(shquote "$script") >> $REMOTE_LOGS/$RUN.log 2>&1 < /dev/null & }"
  note "Started $n points on every worker of $NAME; progress in $REMOTE_LOGS/$RUN.log"
  exit 0
fi

failed=0
for ((i = 0; i < n; i++)); do
  note "== point $((i + 1))/$n: ${points[i]}"
  if ! remote all "set -o pipefail; $(remote_prelude) && { ${points[i]}; } 2>&1 | tee -a $(logfile "$i")"; then
    warn "point $((i + 1)) failed"
    failed=$((failed + 1))
  fi
done
[[ $failed == 0 ]] || die "$failed of $n points failed"
