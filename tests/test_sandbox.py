"""The sandbox contains what a model-written program may try: each test runs one escape attempt
and checks, from the host, that it failed and that the caller is unharmed."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import pytest

from t2jax.tasks import sandbox

_WHY = sandbox._unavailable_reason()  # pylint: disable=protected-access
needs_bwrap = pytest.mark.skipif(
    _WHY is not None,
    reason=f"bubblewrap is not usable here ({_WHY}); install it: `apt-get install bubblewrap`")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(source: str, **kw) -> sandbox.Result:
  kw.setdefault("timeout_s", 10.0)
  return sandbox.run(textwrap.dedent(source), **kw)


def _host_pids_with(marker: str) -> list[int]:
  """Host processes whose command line holds `marker` (psutil-free /proc scan)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:  # exited while we looked
      pass
  return found


@needs_bwrap
def test_exit_status_output_and_stdin():
  ok = _run("import sys\nprint('hello', input())\nprint('warn', file=sys.stderr)", stdin="you\n")
  assert (ok.passed, ok.timed_out, ok.returncode, ok.isolated) == (True, False, 0, True)
  assert ok.stdout == "hello you\n" and ok.stderr == "warn\n"
  failed = _run("import sys\nsys.exit(3)")
  assert (failed.passed, failed.returncode) == (False, 3)
  bad = _run("def f(:\n  pass")
  assert not bad.passed and "SyntaxError" in bad.stderr


@needs_bwrap
@pytest.mark.parametrize("prefix", ["", "import os\nos.close(1)\nos.close(2)\n"],
                         ids=["plain", "closed_stdout"])
def test_infinite_loop_times_out(prefix):
  start = time.monotonic()
  r = _run(prefix + "while True:\n  pass", timeout_s=2.0)
  assert r.timed_out and not r.passed and r.returncode is None
  assert time.monotonic() - start < 6.0


@needs_bwrap
@pytest.mark.parametrize("parent", ["exits", "loops"])
def test_no_process_outlives_the_run(parent):
  marker = f"t2jax-sandbox-test-{uuid.uuid4().hex}"
  # a double-forked, setsid grandchild writing a file forever, marked on its command line
  source = f"""\
      import os, sys, time
      if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
          os.execv(sys.executable, [sys.executable, "-c",
                   "import time\\nwhile True:\\n  open('alive', 'w').write('x'); time.sleep(0.05)",
                   "{marker}"])
        os._exit(0)
      for _ in range(100):
        if os.path.exists("alive"):
          break
        time.sleep(0.02)
      print("grandchild running:", os.path.exists("alive"), flush=True)
      while {parent == "loops"}:
        pass
      """
  start = time.monotonic()
  r = _run(source, timeout_s=2.0)
  assert time.monotonic() - start < 5.0
  assert "grandchild running: True" in r.stdout, r.stderr
  assert r.timed_out == (parent == "loops") and r.passed == (parent == "exits")
  left = _host_pids_with(marker)
  for _ in range(20):  # the kernel tears the pid namespace down asynchronously
    if not left:
      break
    time.sleep(0.1)
    left = _host_pids_with(marker)
  assert not left, f"sandbox processes {left} survived the run"


@needs_bwrap
def test_fork_storm_is_capped():
  counted = _run("""\
      import os, time
      n = 0
      for _ in range(2000):
        try:
          pid = os.fork()
        except OSError:
          continue
        if pid == 0:
          time.sleep(60)
          os._exit(0)
        n += 1
      print("forks", n)
      """, max_processes=16)
  assert counted.passed, counted.stderr
  forks = int(counted.stdout.split()[-1])
  assert 1 <= forks <= 16
  start = time.monotonic()
  bomb = _run("""\
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
      """, timeout_s=2.0, max_processes=16)
  assert bomb.timed_out and time.monotonic() - start < 6.0
  assert subprocess.run(["true"], check=False).returncode == 0  # the host can still spawn


@needs_bwrap
def test_memory_is_capped():
  r = _run("""\
      try:
        big = bytearray(4 * 2**30)
        print("allocated 4 GiB")
      except MemoryError:
        print("MemoryError: 4 GiB")
      chunks = []
      try:
        while True:
          chunks.append(bytearray(2**20))
      except MemoryError:
        n = len(chunks)
        chunks.clear()
        print("MemoryError after MiB:", n)
      """, memory_mb=256)
  assert r.passed, r.stderr
  assert "MemoryError: 4 GiB" in r.stdout
  assert int(r.stdout.split("MiB:")[1]) < 256
  uncaught = _run("x = bytearray(4 * 2**30)", memory_mb=256)
  assert not uncaught.passed and "MemoryError" in uncaught.stderr


@needs_bwrap
def test_writes_stay_in_the_work_dir(tmp_path):
  tag = uuid.uuid4().hex
  outside = [f"/etc/t2jax-{tag}", str(tmp_path / f"host-tmp-{tag}"),
             os.path.join(os.path.expanduser("~"), f"t2jax-{tag}"), str(REPO / f"t2jax-{tag}"),
             f"/t2jax-{tag}"]
  r = _run(f"""\
      for path in {outside!r}:
        try:
          with open(path, "w") as f:
            f.write("escaped")
          print("WROTE", path)
        except OSError as e:
          print("blocked", path, type(e).__name__)
      with open("inside.txt", "w") as f:
        f.write("ok")
      print("inside", open("inside.txt").read())
      try:
        with open("big", "wb") as f:
          f.write(bytes(32 << 20))
        print("WROTE 32 MiB")
      except OSError as e:
        print("big file blocked", type(e).__name__)
      """)
  assert r.passed, r.stderr
  assert "WROTE" not in r.stdout and r.stdout.count("blocked") == len(outside) + 1
  assert "inside ok" in r.stdout
  assert not [p for p in outside if os.path.exists(p)]


@needs_bwrap
def test_no_network():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    r = _run(f"""\
        import socket
        for addr in [("1.1.1.1", 53), ("127.0.0.1", {port})]:
          try:
            socket.create_connection(addr, timeout=2).close()
            print("CONNECTED", addr)
          except OSError as e:
            print("blocked", addr, type(e).__name__)
        """)
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):
      server.accept()  # the sandbox never reached the host's loopback
  assert r.passed, r.stderr
  assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 2


@needs_bwrap
def test_environment_and_host_processes_are_hidden(monkeypatch):
  secret = f"secret-{uuid.uuid4().hex}"
  monkeypatch.setenv("T2JAX_SECRET_TEST", secret)
  r = _run("""\
      import os
      print(dict(os.environ))
      for path in ["/proc/1/environ", f"/proc/{os.getppid()}/environ", "/proc/self/environ"]:
        try:
          print(path, open(path, "rb").read())
        except OSError as e:
          print(path, type(e).__name__)
      print("pids", sum(p.isdigit() for p in os.listdir("/proc")))
      status = dict(line.split(":", 1) for line in open("/proc/self/status"))
      print("uid", os.getuid(), "capeff", int(status["CapEff"], 16))
      """)
  assert r.passed, r.stderr
  assert secret not in r.stdout + r.stderr and "T2JAX_SECRET_TEST" not in r.stdout
  assert int(r.stdout.split("pids ")[1].split()[0]) <= 3  # bwrap's init and the program
  uid, capeff = r.stdout.split("uid ")[1].split(" capeff ")
  assert int(capeff) == 0
  if os.geteuid() == 0:
    assert int(uid) != 0  # root is exempt from RLIMIT_NPROC, so the program must not be root


@needs_bwrap
def test_huge_output_is_truncated():
  endless = _run("while True:\n  print('x' * 1000)", timeout_s=2.0)
  assert endless.timed_out
  assert len(endless.stdout) <= sandbox.OUTPUT_CAP + 200 and "truncated" in endless.stdout
  finite = _run("import sys\nsys.stdout.write('y' * (8 << 20))")  # drained, so it can finish
  assert finite.passed and "truncated" in finite.stdout
  assert finite.stdout.startswith("y" * sandbox.OUTPUT_CAP)


@pytest.fixture
def no_bwrap(monkeypatch):
  sandbox._unavailable_reason.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
  monkeypatch.setattr(sandbox, "_warned_unsafe", False)
  yield
  sandbox._unavailable_reason.cache_clear()  # pylint: disable=protected-access


@pytest.mark.usefixtures("no_bwrap")
def test_missing_bwrap_needs_explicit_unsafe():
  assert not sandbox.available()
  with pytest.raises(sandbox.SandboxUnavailable,
                     match=r"bubblewrap.*apt-get install bubblewrap.*task_args.unsafe_sandbox"):
    sandbox.run("print(1)", timeout_s=5)
  assert issubclass(sandbox.SandboxUnavailable, RuntimeError)
  with pytest.warns(UserWarning, match="not isolated"):
    r = sandbox.run("print(input())", timeout_s=5, unsafe=True, stdin="plain\n")
  assert (r.passed, r.stdout, r.isolated) == (True, "plain\n", False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once only
    start = time.monotonic()
    looped = sandbox.run("while True:\n  pass", timeout_s=1.0, unsafe=True)
  assert looped.timed_out and time.monotonic() - start < 4.0
  big = sandbox.run("x = bytearray(4 * 2**30)", timeout_s=5, unsafe=True, memory_mb=256)
  assert not big.passed and "MemoryError" in big.stderr  # rlimits still apply


@needs_bwrap
def test_an_interpreter_installed_under_tmp_runs(tmp_path):
  # CI runners and tox make their virtualenvs under /tmp; the sandbox's own /tmp must not
  # hide that interpreter ("bwrap: execvp …/venv/bin/python: No such file or directory")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                  str(venv)], check=True, timeout=120)
  code = ("from t2jax.tasks import sandbox; "
          "r = sandbox.run('import sys; print(6 * 7, sys.prefix)', timeout_s=20); "
          "print(r.returncode, r.stdout.strip(), r.stderr.strip()[-200:])")
  out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                       text=True, timeout=120, cwd=REPO, check=True)
  assert out.stdout.split()[:3] == ["0", "42", str(venv)], out.stdout + out.stderr
