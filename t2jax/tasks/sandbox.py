"""Run a model-written Python program in a bubblewrap sandbox and report how it ended.

    result = sandbox.run(source, timeout_s=5.0)   # Result(passed, timed_out, returncode, ...)

The program runs in its own pid, net, ipc, uts and mount namespaces: a read-only view of the
system dirs and of this interpreter's install, a private size-capped tmpfs as its cwd, only
loopback networking, a scrubbed environment, rlimits on memory, CPU, file size, open files
and processes, and a wall-clock timeout that kills the whole namespace.

Why root is handled differently: the kernel exempts uid 0 from RLIMIT_NPROC, even inside a user
namespace, so a fork storm run as root is not stopped. An unprivileged bwrap cannot help either:
this interpreter may live under a dir only root can enter (/root/.pyenv), which bwrap, run as
nobody, cannot bind. So as root, bwrap runs privileged (no user namespace) and a trusted prelude,
the first code in the sandbox, sets the rlimits and drops to a fresh unprivileged uid before it
execs the program. Each run gets its own uid because RLIMIT_NPROC counts every process of a uid.
As any other user, bwrap runs unprivileged (with a user namespace) and the prelude only sets the
rlimits; RLIMIT_NPROC then counts the sandbox's own processes (Linux >= 5.14).

Not covered: memory of tmpfs files (capped by the tmpfs size instead), kernel memory, the CPU
share of each process (2 busy processes use 2 cores until the timeout), and nested user
namespaces created by the program (the kernel's unprivileged surface stays reachable).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

OUTPUT_CAP = 64 << 10  # bytes kept of each of stdout and stderr
FILE_SIZE_CAP = 16 << 20  # RLIMIT_FSIZE: the largest file the program may write
TMPFS_BYTES = 64 << 20  # the work dir's tmpfs: all files together, held in RAM
OPEN_FILES = 256
KILL_GRACE_S = 1.0  # after a kill: how long to drain the pipes before giving up on them
WORK = "/tmp/work"  # the program's cwd and HOME inside the sandbox
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_NOBODY = 65534
# Per-run uids for the root case; a uid outside this container's uid map falls back to nobody.
_UID_BASE, _UID_SPAN = 1_500_000_000, 100_000_000
_run_ids = itertools.count()
_warned_unsafe = False


class SandboxUnavailable(RuntimeError):
  """bubblewrap is missing or unusable here and unsafe execution was not allowed."""


@dataclasses.dataclass(frozen=True)
class Result:
  passed: bool  # exited 0 within the timeout
  timed_out: bool  # killed at the timeout (returncode is then None)
  returncode: int | None  # the program's exit status; 128 + N when signal N killed it in bwrap
  stdout: str  # at most OUTPUT_CAP bytes, then a note saying how much was dropped
  stderr: str
  seconds: float  # wall time, sandbox start-up included
  isolated: bool  # False when run without bubblewrap (unsafe=True)


def run(source: str, *, timeout_s: float, memory_mb: int = 512, max_processes: int = 32,
        unsafe: bool = False, stdin: str = "") -> Result:
  """Run `source` as a Python program (file main.py in its cwd) with `stdin` as its input."""
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
  if memory_mb < 64:
    raise ValueError(f"memory_mb must be >= 64 (the interpreter needs ~30 MB), got {memory_mb}.")
  if max_processes < 1:
    raise ValueError(f"max_processes must be >= 1, got {max_processes}.")
  limits = _limits(timeout_s, memory_mb)
  reason = _unavailable_reason()
  if reason is None:
    return _run_bwrap(source, timeout_s, limits + [("RLIMIT_NPROC", max_processes)], stdin)
  if not unsafe:
    raise SandboxUnavailable(
        f"cannot sandbox model-written code: {reason}. Install bubblewrap (Debian/Ubuntu: "
        "`apt-get install bubblewrap`); unless run as root it also needs unprivileged user "
        "namespaces (Ubuntu >= 23.10 restricts them: sysctl "
        "kernel.apparmor_restrict_unprivileged_userns=0). Or set task_args.unsafe_sandbox=True "
        "to run the code WITHOUT isolation (it can then read and write your files and use the "
        "network; only on a throwaway machine).")
  _warn_unsafe(reason)
  # no RLIMIT_NPROC: outside a namespace it counts all processes of the caller's uid
  return _run_unsafe(source, timeout_s, limits, stdin)


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[str, int]]:
  # RLIMIT_CPU is a backstop per process (SIGKILL past it); the wall timeout normally comes first
  return [("RLIMIT_AS", memory_mb << 20), ("RLIMIT_CPU", int(timeout_s) + 2),
          ("RLIMIT_FSIZE", FILE_SIZE_CAP), ("RLIMIT_NOFILE", OPEN_FILES), ("RLIMIT_CORE", 0)]


def available() -> bool:
  """Whether bubblewrap can sandbox a program here (tried once, then cached)."""
  return _unavailable_reason() is None


def _find_bwrap() -> str | None:
  return shutil.which("bwrap") or ("/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK)
                                    else None)


@functools.cache
def _unavailable_reason() -> str | None:
  """None when a trial program runs under bwrap, else what is wrong."""
  if _find_bwrap() is None:
    return "the bubblewrap executable `bwrap` was not found on PATH or at /usr/bin/bwrap"
  if not sys.executable:
    return "sys.executable is empty, so there is no interpreter to run in the sandbox"
  try:
    r = _run_bwrap("print('ok')", 30.0, _limits(30.0, 512) + [("RLIMIT_NPROC", 32)], "")
  except OSError as e:
    return f"starting bwrap failed: {e}"
  if not r.passed or r.stdout != "ok\n":
    return (f"a trial run under bwrap failed (exit status {r.returncode}, timed out: "
            f"{r.timed_out}): {r.stderr.strip()[-500:] or 'no error output'}")
  return None


def _warn_unsafe(reason: str) -> None:
  global _warned_unsafe  # pylint: disable=global-statement
  if not _warned_unsafe:
    _warned_unsafe = True
    warnings.warn(f"sandbox: {reason}; as unsafe=True, model-written code runs not isolated: "
                  "only rlimits and a timeout apply, and it can read and write this user's "
                  "files and use the network.", stacklevel=3)


def _prelude(limits: list[tuple[str, int]], uid: int | None, argv: list[str]) -> str:
  """Trusted code run first in the sandbox: set the rlimits, drop root, exec the program."""
  return f"""\
import os, resource, sys
for name, value in {limits!r}:
  resource.setrlimit(getattr(resource, name), (value, value))
uid = {uid!r}
if uid is not None:
  paths = ({WORK!r}, {WORK + "/main.py"!r})
  os.setgroups([])
  try:
    for p in paths: os.chown(p, uid, uid)
    os.setgid(uid); os.setuid(uid)
  except OSError:  # uid outside this container's uid map
    for p in paths: os.chown(p, {_NOBODY}, {_NOBODY})
    os.setgid({_NOBODY}); os.setuid({_NOBODY})
os.execv(sys.executable, {argv!r})
"""


def _program_env(home: str) -> dict[str, str]:
  # PYTHONHASHSEED fixes set/dict order of str keys so a program's output, hence its reward, is
  # reproducible; the program runs with -s, not -I, because -I would ignore it. The env is
  # built here from scratch, so nothing of the caller's (PYTHONPATH, secrets) gets in.
  bindir = os.path.dirname(sys.executable)
  return {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
          "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _under(path: str, parent: str) -> bool:
  return path == parent or path.startswith(parent.rstrip("/") + "/")


def _python_dirs() -> list[str]:
  """Dirs of this interpreter's install (and venv) that the system binds do not cover."""
  paths = {os.path.dirname(os.path.realpath(sys.executable))}
  for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(sys.executable)):
    paths |= {os.path.abspath(p), os.path.realpath(p)}
  covered = [os.path.realpath(d) for d in _SYSTEM_DIRS if os.path.exists(d)]
  keep: list[str] = []
  for p in sorted(paths):  # sorted: a parent comes before the dirs under it
    if p != "/" and not any(_under(p, c) for c in covered + keep):
      keep.append(p)
  return keep


def _bwrap_argv(bwrap: str, src_fd: int, as_root: bool, prelude: str) -> list[str]:
  if as_root:  # no user namespace, so the prelude can drop to a real unprivileged uid
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try"]
  else:
    argv = [bwrap, "--unshare-all"]
  argv += ["--die-with-parent", "--new-session", "--clearenv"]
  for k, v in _program_env(WORK).items():
    argv += ["--setenv", k, v]
  for d in _SYSTEM_DIRS:  # merged-/usr systems have /bin -> usr/bin: keep it a link
    if os.path.islink(d):
      argv += ["--symlink", os.readlink(d), d]
    elif os.path.isdir(d):
      argv += ["--ro-bind", d, d]
  # bwrap < 0.7 has no --size: its tmpfs may then grow to half the RAM (files <= FILE_SIZE_CAP)
  size = (lambda n: ["--size", str(n)]) if _has_size_option(bwrap) else (lambda n: [])
  # the private /tmp first: an interpreter installed under /tmp (a CI or tox virtualenv) is
  # then bound on top of it, not hidden beneath it
  argv += [*size(TMPFS_BYTES), "--tmpfs", "/tmp", "--dir", WORK]
  for d in _python_dirs():
    # bwrap would copy the modes of the parents (/root is 0700), hiding the install from uid
    parts = d.strip("/").split("/")
    for i in range(1, len(parts)):
      argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
    argv += ["--ro-bind", d, d]
  argv += ["--proc", "/proc", "--dev", "/dev",
           "--file", str(src_fd), WORK + "/main.py",
           *size(1 << 20), "--tmpfs", "/dev/shm",
           "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORK,
           "--", sys.executable, "-I", "-S", "-c", prelude]
  return argv


@functools.cache
def _has_size_option(bwrap: str) -> bool:
  r = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
  return "--size" in r.stdout + r.stderr


def _run_bwrap(source: str, timeout_s: float, limits: list[tuple[str, int]],
               stdin: str) -> Result:
  bwrap = _find_bwrap()
  assert bwrap is not None
  as_root = os.geteuid() == 0
  uid = None
  if as_root:
    uid = _UID_BASE + (os.getpid() % 1000 * 100_000 + next(_run_ids) % 100_000) % _UID_SPAN
  program = [sys.executable, "-s", "-B", "main.py"]
  prelude = _prelude(limits, uid, program)
  src_fd = _memfd(source)
  try:
    argv = _bwrap_argv(bwrap, src_fd, as_root, prelude)
    return _execute(argv, timeout_s=timeout_s, stdin=stdin, cwd="/", pass_fds=(src_fd,),
                    env={"PATH": "/usr/bin:/bin"}, isolated=True)
  finally:
    os.close(src_fd)


def _run_unsafe(source: str, timeout_s: float, limits: list[tuple[str, int]],
                stdin: str) -> Result:
  with tempfile.TemporaryDirectory(prefix="t2jax-unsafe-") as work:
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
      f.write(source)
    prelude = _prelude(limits, None, [sys.executable, "-s", "-B", "main.py"])
    return _execute([sys.executable, "-I", "-S", "-c", prelude], timeout_s=timeout_s,
                    stdin=stdin, cwd=work, pass_fds=(), env=_program_env(work), isolated=False)


def _memfd(text: str) -> int:
  fd = os.memfd_create("t2jax-sandbox")
  os.write(fd, text.encode("utf-8", errors="replace"))  # a lone surrogate must not raise
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


class _Capped:
  """The first OUTPUT_CAP bytes of a stream; the rest is counted and dropped."""

  def __init__(self):
    self.data = bytearray()
    self.dropped = 0

  def add(self, chunk: bytes) -> None:
    room = OUTPUT_CAP - len(self.data)
    self.data += chunk[:room]
    self.dropped += max(len(chunk) - room, 0)

  def text(self) -> str:
    out = self.data.decode("utf-8", errors="replace")
    if self.dropped:
      out += f"\n[sandbox: output truncated at {OUTPUT_CAP} bytes, {self.dropped} more dropped]"
    return out


def _execute(argv: list[str], *, timeout_s: float, stdin: str, cwd: str,
             pass_fds: tuple[int, ...], env: dict[str, str], isolated: bool) -> Result:
  """Run argv in a new session; kill its process group at the timeout; keep capped output."""
  # Output is read with select rather than communicate(): communicate keeps all of it, and a
  # program printing in a loop until the timeout would fill the caller's memory.
  stdin_fd = _memfd(stdin) if stdin else None
  start = time.monotonic()
  deadline = start + timeout_s
  try:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin_fd is None else stdin_fd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                            pass_fds=pass_fds, start_new_session=True)
  finally:
    if stdin_fd is not None:
      os.close(stdin_fd)
  out, err = _Capped(), _Capped()
  with selectors.DefaultSelector() as sel:
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    _drain(sel, deadline)  # until both pipes close or the deadline
    timed_out = False
    try:
      proc.wait(timeout=max(deadline - time.monotonic(), 0))  # it may have closed its pipes
    except subprocess.TimeoutExpired:
      timed_out = True
    if timed_out or sel.get_map():
      # bwrap's pid namespace dies with its init, which dies with bwrap (--die-with-parent);
      # unsafe runs: this reaches every process that kept the session's process group
      _kill_group(proc.pid)
      _drain(sel, time.monotonic() + KILL_GRACE_S)
  proc.stdout.close()
  proc.stderr.close()
  try:
    proc.wait(timeout=KILL_GRACE_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  rc = None if timed_out else proc.returncode
  return Result(passed=rc == 0, timed_out=timed_out, returncode=rc, stdout=out.text(),
                stderr=err.text(), seconds=time.monotonic() - start, isolated=isolated)


def _drain(sel: selectors.BaseSelector, until: float) -> None:
  while sel.get_map():
    left = until - time.monotonic()
    if left <= 0:
      return
    for key, _ in sel.select(timeout=left):
      chunk = os.read(key.fd, 1 << 16)
      if chunk:
        key.data.add(chunk)
      else:
        sel.unregister(key.fileobj)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
