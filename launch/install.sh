#!/usr/bin/env bash
# Put the code on every worker of a TPU VM and install it there.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="${ROUTING_LM_REPO:-}"
REF="${ROUTING_LM_REF:-HEAD}"
PYTHON_VERSION="${ROUTING_LM_PYTHON_VERSION:-3.12}"

usage() {
  cat <<EOF
Usage: launch/install.sh [flags]

On every worker (--worker=all): put the code in ~/$REMOTE_DIR, either a copy of this
checkout (tracked and untracked files that git does not ignore) or, with --repo, a git
clone; then create ~/$REMOTE_DIR/.venv with uv (Python $PYTHON_VERSION: the TPU images'
system Python 3.10 is too old for current jax) and pip-install the package with jax[tpu].
Run it again after changing the code.

  --repo URL              git clone URL instead of copying this checkout (ROUTING_LM_REPO)
  --ref REF               branch, tag or commit to check out (default HEAD) (ROUTING_LM_REF)
  --python-version V      Python for the venv (default 3.12) (ROUTING_LM_PYTHON_VERSION)
EOF
  common_help name zone project
}

script_flag() {
  case "$1" in
    --repo) need_value "$@"; REPO="$2"; SHIFT=2 ;;
    --ref) need_value "$@"; REF="$2"; SHIFT=2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION="$2"; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require NAME ZONE

# Runs on each worker, in the home directory, once the code is in ~/routing_lm.
# shellcheck disable=SC2016  # $HOME and $PATH expand on the worker
setup='export PATH="$HOME/.local/bin:$PATH"'
setup+=' && { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }'
setup+=" && cd $REMOTE_DIR"
setup+=" && { [ -x .venv/bin/python ] || uv venv --python $(shquote "$PYTHON_VERSION") .venv; }"
setup+=" && uv pip install --python .venv/bin/python -e \".[tpu]\""

if [[ -n $REPO ]]; then
  fetch="{ [ -d $REMOTE_DIR/.git ] || git clone -q $(shquote "$REPO") $REMOTE_DIR; }"
  fetch+=" && git -C $REMOTE_DIR fetch -q origin $(shquote "$REF")"
  fetch+=" && git -C $REMOTE_DIR checkout -q --detach FETCH_HEAD"
  remote all "$fetch && $setup"
else
  git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$ROOT is not a git checkout; pass --repo URL to clone one instead"
  tarball="${TMPDIR:-/tmp}"
  tarball="${tarball%/}/routing_lm-$NAME.tar.gz"
  run_sh "cd $(shquote "$ROOT") && git ls-files -z -co --exclude-standard | COPYFILE_DISABLE=1 tar -czf $(shquote "$tarball") --null -T -"
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${TPU_FLAGS[@]}" --worker=all
  run rm -f "$tarball"
  unpack="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR && rm $REMOTE_DIR.tar.gz"
  remote all "$unpack && $setup"
fi
note "Next: launch/train.sh --name $NAME ${TPU_FLAGS[*]} --bucket BUCKET --config configs/tiny.py"
