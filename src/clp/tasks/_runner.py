"""The child side of the task sandbox: run as a script (``python -I -B _runner.py ...``) inside
fresh namespaces, never imported by the benchmark's own process.

Order matters: first the kernel-enforced layers that need root inside the new mount namespace
(every mount read-only except the work folder), then resource limits, then the audit hook,
and only then the untrusted program. A blocked action ends the run at once (exit 101), so a
program cannot catch the error and carry on as if it had passed.

Exit codes: 0 the program ran to its end; 1 it raised; 2 it called sys.exit; 3 the sandbox
could not be set up; 101 it tried something the guard blocks.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import traceback
from pathlib import Path

BLOCKED = 101
# Whole families of events a test program has no business raising.
BLOCKED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn")
BLOCKED_EVENTS = {
    "os.system",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "pty.spawn",
}
# Events that change the file system: allowed only for paths inside the work folder.
PATH_EVENTS = {
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.utime",
    "os.chflags",
    "os.lchflags",
    "os.setxattr",
    "os.removexattr",
    "shutil.rmtree",
    "shutil.chown",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

# mount(2) flags, for remounting every mount read-only while keeping the flags it has
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


def _unescape(field: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def read_only_filesystem(work: str) -> None:
    """Make every mount of this (private) mount namespace read-only, nosuid and nodev, except
    ``work``, bind-mounted onto itself first. nodev matters: a read-only mount still lets root
    write to a block device node under /dev."""
    import ctypes  # used here, before the audit hook; the hook then blocks all ctypes calls

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target, flags) -> None:
        if libc.mount(source, target.encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")

    mount(None, "/", MS_REC | MS_PRIVATE)  # nothing done here may reach the parent namespace
    mount(work.encode(), work, MS_BIND)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = _unescape(fields[4])
        if target == work:
            continue
        keep = 0
        for opt in fields[5].split(","):
            keep |= OPTION_FLAGS.get(opt, 0)
        mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later `import ctypes` must load it again, past the hook


def limit_resources(seconds: float, memory_mb: int, file_mb: int) -> None:
    """CPU time, address space, file size and open files; no core dumps."""
    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _inside(path, work: str) -> bool:
    if isinstance(path, int):
        return True  # a descriptor: opening its file was checked already
    # (a path relative to a dir_fd is resolved against the cwd here: the read-only mounts,
    # not this hook, stop that one)
    real = os.path.realpath(os.fsdecode(path))
    return real == work or real.startswith(work + os.sep)


def _stop(event: str, detail: str = "") -> None:
    os.write(2, f"\nsandbox: blocked {event}{' ' + detail if detail else ''}\n".encode())
    os._exit(BLOCKED)


def make_hook(work: str):
    """The audit hook: no sockets, processes, signals or ctypes; no writes outside ``work``."""

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            _stop(event)
        elif event == "open":
            path, _mode, flags = args
            if flags is not None and flags & WRITE_FLAGS and not _inside(path, work):
                _stop("open for writing", repr(path))
        elif event in PATH_EVENTS:
            for arg in args:
                if isinstance(arg, str | bytes | os.PathLike) and not _inside(arg, work):
                    _stop(event, repr(arg))

    return hook


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--file-mb", type=int, default=16)
    p.add_argument("--isolate", action="store_true", help="remount the file system read-only")
    p.add_argument("--no-guard", action="store_true", help="tests only: kernel layers alone")
    p.add_argument("program", nargs="?")
    a = p.parse_args()
    work = os.path.realpath(a.work)
    try:
        if a.isolate:
            read_only_filesystem(work)
        os.chdir(work)
        limit_resources(a.seconds, a.memory_mb, a.file_mb)
    except OSError as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr)
        return 3
    program = a.program and os.path.realpath(a.program)
    source = Path(program).read_text() if program else ""  # before the hook, from anywhere
    if not a.no_guard:
        sys.addaudithook(make_hook(work))
    if not program:
        return 0  # a probe: the setup works
    try:
        code = compile(source, "program.py", "exec")
    except SyntaxError:
        traceback.print_exc(limit=0)
        return 1
    return _execute(code)


def _execute(code) -> int:
    """Run the program as a module that is not ``__main__`` (its demo blocks stay quiet, as in
    HumanEval's own harness); 0 only when it runs to its end."""
    try:
        exec(code, {"__name__": "candidate", "__builtins__": __builtins__})
    except SystemExit as exc:
        print(f"SystemExit: exited ({exc.code}) before the tests ended", file=sys.stderr)
        return 2
    except BaseException:  # noqa: BLE001 - any failure of the program is its result
        traceback.print_exc(limit=3)
        return 1
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: atexit handlers are the program's, not ours
