# shellcheck shell=bash disable=SC2034  # the scripts sourcing this use its variables
# Shared by the launch/ scripts: flags and environment, `run`, the remote layout.
# Source it from a script that defines `usage` (and, for its own flags, `script_flag`).
#
# Every parameter comes from a flag or, failing that, from ROUTING_LM_<NAME>:
# --zone or ROUTING_LM_ZONE, --accelerator-type or ROUTING_LM_ACCELERATOR_TYPE, ...
# Written for bash >= 3.2 (macOS) as well as Linux.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the local checkout

PROJECT="${ROUTING_LM_PROJECT:-}"
ZONE="${ROUTING_LM_ZONE:-}"
NAME="${ROUTING_LM_NAME:-}"
ACCELERATOR_TYPE="${ROUTING_LM_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${ROUTING_LM_RUNTIME_VERSION:-}"
BUCKET="${ROUTING_LM_BUCKET:-}"
DRY_RUN="${ROUTING_LM_DRY_RUN:-0}"
EXTRA_ARGS=()   # whatever follows `--`

# On every worker: the code lives in ~/routing_lm (its venv in ~/routing_lm/.venv),
# each run's output in ~/routing_lm_logs/<run>.log.
REMOTE_DIR="routing_lm"
# shellcheck disable=SC2088  # ~ expands on the worker
REMOTE_LOGS="~/routing_lm_logs"

die() {
  echo "error: $*" >&2
  exit 2
}

warn() { echo "warning: $*" >&2; }
note() { echo "$*" >&2; }

# One help line per common parameter the calling script uses.
common_help() {
  local p
  for p in "$@"; do
    case "$p" in
      name)             echo "  --name NAME             TPU VM (or queued resource) name (ROUTING_LM_NAME)" ;;
      zone)             echo "  --zone ZONE             e.g. us-west4-a (ROUTING_LM_ZONE)" ;;
      project)          echo "  --project ID            default: gcloud's configured project (ROUTING_LM_PROJECT)" ;;
      accelerator-type) echo "  --accelerator-type T    e.g. v5litepod-8, v4-32, v5p-8, v6e-8 (ROUTING_LM_ACCELERATOR_TYPE)" ;;
      runtime-version)  echo "  --runtime-version V     default by family: v4 tpu-ubuntu2204-base, v5e/v5litepod"
                        echo "                          v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e"
                        echo "                          (ROUTING_LM_RUNTIME_VERSION)" ;;
      bucket)           echo "  --bucket BUCKET         GCS bucket for workdirs (gs:// optional) (ROUTING_LM_BUCKET)" ;;
    esac
  done
  echo "  --dry-run               print every command instead of running it (ROUTING_LM_DRY_RUN=1)"
  echo "  -h, --help              show this help"
}

# Dies unless a flag's value follows it: `need_value "$@"` with the flag in $1.
need_value() {
  [[ $# -ge 2 ]] || die "$1 needs a value"
}

# Parses the common flags, hands the others to `script_flag` (which returns 1 for an
# unknown flag and sets SHIFT=2 when it used a value), and keeps what follows `--`.
# Both `--flag value` and `--flag=value` work.
parse_args() {
  local args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --) args+=("$@"); break ;;
      --*=*) args+=("${1%%=*}" "${1#*=}") ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  set -- ${args[@]+"${args[@]}"}
  while [[ $# -gt 0 ]]; do
    SHIFT=1
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --project) need_value "$@"; PROJECT="$2"; SHIFT=2 ;;
      --zone) need_value "$@"; ZONE="$2"; SHIFT=2 ;;
      --name) need_value "$@"; NAME="$2"; SHIFT=2 ;;
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; SHIFT=2 ;;
      --runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; SHIFT=2 ;;
      --bucket) need_value "$@"; BUCKET="$2"; SHIFT=2 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      *)
        if ! declare -F script_flag >/dev/null || ! script_flag "$@"; then
          die "unknown argument: $1 (see --help)"
        fi ;;
    esac
    shift "$SHIFT"
  done
  case "$DRY_RUN" in 0|false|no|'') DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%/}"
  TPU_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then TPU_FLAGS+=("--project=$PROJECT"); fi
}

# `require ZONE NAME ...`: each variable must be set, by its flag or its env var.
require() {
  local var flag
  for var in "$@"; do
    if [[ -z ${!var:-} ]]; then
      flag="--$(echo "$var" | tr 'A-Z_' 'a-z-')"
      die "missing $flag (or set ROUTING_LM_$var)"
    fi
  done
}

# `check_name WHAT VALUE`: names that end up in paths and remote commands.
check_name() {
  [[ $2 =~ ^[A-Za-z0-9._-]+$ ]] || die "$1 '$2' may only contain letters, digits, '.', '_', '-'"
}

# A name from a file: configs/paper.py:130m,sbase,64 -> paper-130m-sbase-64, cmds.txt -> cmds.
slug() {
  local file="${1%%:*}" arg="" s
  if [[ $1 == *:* ]]; then arg="-${1#*:}"; fi
  file="${file##*/}"
  file="${file%.py}"
  s="${file%.txt}$arg"
  echo "${s//[^A-Za-z0-9._-]/-}"
}

# Quotes one word for a shell: plain words (flags, paths, gs:// URLs) stay bare, words
# without " $ \ ` ! go in double quotes (readable inside a single-quoted --command=),
# the rest in single quotes.
shquote() {
  local plain='^[A-Za-z0-9_./:=,@%+-]+$' special='["$\\`!]' q="'\\''"
  if [[ $1 =~ $plain ]]; then
    printf '%s' "$1"
  elif ! [[ $1 =~ $special ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}

# The command as one shell line: `+ gcloud ... --command='...'`.
show() {
  local a line="+"
  for a in "$@"; do
    if [[ $a =~ ^--[a-z-]+= ]]; then
      line+=" ${a%%=*}=$(shquote "${a#*=}")"
    else
      line+=" $(shquote "$a")"
    fi
  done
  echo "$line"
}

# Prints the command (stdout) when dry-running; else echoes it to stderr and runs it.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
    return 0
  fi
  show "$@" >&2
  command -v "$1" >/dev/null || die "command not found: $1"
  "$@"
}

# Like `run`, for a local pipeline given as one shell string.
run_sh() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "+ $1"
    return 0
  fi
  echo "+ $1" >&2
  bash -o pipefail -c "$1"
}

# `remote WORKER COMMAND`: run COMMAND on worker WORKER (a number, or `all`).
remote() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_FLAGS[@]}" --worker="$1" --command="$2"
}

# The remote prefix every run starts with: into the checkout, venv on, log dir there.
remote_prelude() {
  echo "cd $REMOTE_DIR && . .venv/bin/activate && mkdir -p $REMOTE_LOGS"
}

# `workdir_url runs|sweeps NAME`: gs://BUCKET/runs/NAME.
workdir_url() {
  require BUCKET
  echo "gs://$BUCKET/$1/$2"
}
