"""Running untrusted Python (a model's code with its unit tests) away from the benchmark.

Each program runs in its own ``python`` process with a wall-clock timeout (its whole process
group is killed when it expires), in a fresh temporary folder, with layers that do not rely on
each other:

1. kernel: new network, mount and PID namespaces (``unshare``, util-linux): no interface but a
   downed loopback, every mount read-only and nodev except the work folder, no other process
   visible or signalable. As root this needs nothing else; otherwise a user namespace is tried.
2. resource limits: CPU seconds, address space, file size, open files.
3. an audit hook (``sys.addaudithook``) in the runner: sockets, subprocesses, signals, ctypes
   and writes outside the work folder end the run at once.

Where no namespace can be made (a non-root machine that forbids user namespaces) layers 2 and
3 still hold, and a warning says so once.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("_runner.py")
NAMESPACES = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
WRAPPERS = (  # tried in order; the first whose probe succeeds is used
    ("unshare", *NAMESPACES, "--"),
    ("unshare", "--user", "--map-root-user", *NAMESPACES, "--"),
)
TAIL = 1 << 16  # bytes of output kept for the reason


@dataclass(frozen=True)
class Outcome:
    """How one program run ended: ``returncode`` None means it was killed at the timeout."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timeout: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0

    @property
    def reason(self) -> str:
        """One line for a report: 'passed', the timeout, the blocked action or the error."""
        if self.returncode == 0:
            return "passed"
        if self.returncode is None:
            return f"timed out after {self.timeout:g} s"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith(("sandbox: blocked", "sandbox setup failed")):
                return line.removeprefix("sandbox: ")
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return lines[-1][:300] if lines else f"exit code {self.returncode}"


def _command(
    wrapper: tuple[str, ...], work: Path, seconds: float, program: Path | None, guard: bool = True
) -> list[str]:
    cmd = [*wrapper, sys.executable, "-I", "-B", str(RUNNER), "--work", str(work)]
    cmd += ["--seconds", f"{seconds:g}"]
    if wrapper:
        cmd.append("--isolate")
    if not guard:
        cmd.append("--no-guard")
    return cmd + ([str(program)] if program else [])


@functools.cache
def wrapper() -> tuple[str, ...]:
    """The namespace wrapper that works on this machine (probed once per process), or ()."""
    failures = []
    if shutil.which("unshare"):
        for candidate in WRAPPERS:
            with tempfile.TemporaryDirectory(prefix="clp-probe-") as tmp:
                cmd = _command(candidate, Path(tmp), 10, None)
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    failures.append(str(exc))
                    continue
                if r.returncode == 0:
                    return candidate
                failures.append((r.stderr.strip().splitlines() or ["?"])[-1])
    else:
        failures.append("unshare (util-linux) is not installed")
    print(
        "warning: the task sandbox runs without namespaces (" + "; ".join(failures) + "): "
        "network and file-system isolation rest on resource limits and an audit hook only",
        file=sys.stderr,
    )
    return ()


def run_python(program: str, timeout: float = 10.0, guard: bool = True) -> Outcome:
    """Run ``program`` in the sandbox; ``guard=False`` leaves out the audit hook (tests check
    the kernel layers on their own that way)."""
    with tempfile.TemporaryDirectory(prefix="clp-task-", ignore_cleanup_errors=True) as tmp:
        outer = Path(tmp)
        work = outer / "work"
        work.mkdir()
        source = outer / "program.py"
        source.write_text(program, encoding="utf-8")
        cmd = _command(wrapper(), work, timeout, source, guard)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                returncode: int | None = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                returncode = None
                _kill_group(proc)
            seconds = time.monotonic() - start
        return Outcome(
            returncode, _tail(outer / "stdout"), _tail(outer / "stderr"), seconds, timeout
        )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the session the program leads (it is not reaped yet, so its id is still its
    group's), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL))
        return f.read().decode("utf-8", errors="replace")
