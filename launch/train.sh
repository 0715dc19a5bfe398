#!/usr/bin/env bash
# Start one config on every worker of a TPU VM, detached from the ssh session.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="${ROUTING_LM_CONFIG:-}"
RUN="${ROUTING_LM_RUN:-}"
WORKDIR="${ROUTING_LM_WORKDIR:-}"
TOPOLOGY="${ROUTING_LM_TOPOLOGY:-}"
SKIP_CHECK="${ROUTING_LM_SKIP_COMPILE_CHECK:-0}"
PYTHON="${ROUTING_LM_PYTHON:-python3}"

usage() {
  cat <<EOF
Usage: launch/train.sh [flags] [-- more routing_lm.main flags]

On every worker (--worker=all), in the background (nohup; it survives the ssh session):
  python -m routing_lm.main --config=CONFIG --workdir=gs://BUCKET/runs/RUN [more flags]
appending its output to ~/routing_lm_logs/RUN.log on each worker (see launch/logs.sh).
Running the same RUN again resumes from its latest checkpoint in the workdir.

Before that, here, the compile check (routing_lm with its tpu extra installed here):
  \$ROUTING_LM_PYTHON -m routing_lm.main --mode=compile --config=CONFIG --topology=SLICE
with the --config.* flags that follow --; nothing starts if CONFIG does not fit SLICE.

  --config FILE[:ARG]     e.g. configs/paper.py:130m,sbase,64 (ROUTING_LM_CONFIG)
  --run RUN               run name (default from the config: paper-130m-sbase-64) (ROUTING_LM_RUN)
  --workdir gs://...      instead of gs://BUCKET/runs/RUN (ROUTING_LM_WORKDIR)
  --topology SLICE        slice to compile for, e.g. v5e:4x4 (default: --accelerator-type)
                          (ROUTING_LM_TOPOLOGY)
  --skip-compile-check    start without compiling here first (ROUTING_LM_SKIP_COMPILE_CHECK=1)
EOF
  common_help name zone accelerator-type bucket project
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
    --topology) need_value "$@"; TOPOLOGY="$2"; SHIFT=2 ;;
    --skip-compile-check) SKIP_CHECK=1 ;;
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

# The compile check, here, before anything starts on the workers.
topology="${TOPOLOGY:-$ACCELERATOR_TYPE}"
case "$SKIP_CHECK" in 0|false|no|'') SKIP_CHECK=0 ;; *) SKIP_CHECK=1 ;; esac
if [[ $SKIP_CHECK == 1 ]]; then
  note "skipping the compile check (--skip-compile-check)"
elif [[ -z $topology ]]; then
  warn "no compile check: pass --accelerator-type (as to create.sh) or --topology to check" \
    "that $CONFIG fits the slice before it starts"
else
  check=("$PYTHON" -m routing_lm.main --mode=compile --config="$CONFIG" --topology="$topology")
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    if [[ $arg == --config.* ]]; then check+=("$arg"); fi
  done
  (cd "$ROOT" && run "${check[@]}") ||
    die "the compile check failed: $CONFIG does not fit or does not compile on $topology" \
      "(the levers are printed above); change the config or the slice, or --skip-compile-check"
fi

cmd="python -m routing_lm.main --config=$(shquote "$CONFIG") --workdir=$(shquote "$WORKDIR")"
for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
  cmd+=" $(shquote "$arg")"
done
log="$REMOTE_LOGS/$RUN.log"
remote all "$(remote_prelude) && { nohup $cmd >> $log 2>&1 < /dev/null & }"
note "Started $RUN on every worker of $NAME; workdir $WORKDIR"
note "Follow: launch/logs.sh --name $NAME ${TPU_FLAGS[*]} --run $RUN"
