"""Child processes for interop peers: logs to a file, killed with their owner.

Peers are started with `subprocess.Popen` from the calling thread (not
trio's worker threads) so that `PR_SET_PDEATHSIG` ties them to this process:
if the test process dies hard, the kernel kills the peer too. Normal cleanup
is `stop()`: SIGTERM, a short grace period, then SIGKILL, shielded from
cancellation so an aborted test still reaps its peers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

_PR_SET_PDEATHSIG = 1


class PeerProcessError(RuntimeError):
    """An interop peer failed to start or died; the message carries its log tail."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    """A peer process whose stdout/stderr (or just stderr) go to `log_path`."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        pipes: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log,
            cwd=cwd,
            env=env,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self, lines: int = 40) -> str:
        rc = self.returncode()
        state = "running" if rc is None else f"exited with {rc}"
        head = f"{self.argv[0]} (pid {self.pid}) {state}; last log lines from {self.log_path}:"
        return f"{head}\n{self.log_tail(lines)}"

    async def stop(self, grace: float = 3.0) -> None:
        """Terminate and reap; never raises, never blocks past grace + 2 s."""
        with trio.CancelScope(shield=True):
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    while self.popen.poll() is None:
                        await trio.sleep(0.02)
            if self.popen.poll() is None:
                self.popen.kill()
                with trio.move_on_after(2.0):
                    while self.popen.poll() is None:
                        await trio.sleep(0.02)
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    pipe.close()
            self._log.close()


def pipe_streams(proc: ManagedProcess) -> tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """trio streams (to stdin, from stdout) that take over the child's pipes.

    The Popen file objects are closed so the trio stream holds the only write
    end of stdin: closing it is the EOF that tells the child to stop.
    """
    stdin, stdout = proc.popen.stdin, proc.popen.stdout
    assert stdin is not None and stdout is not None
    send = trio.lowlevel.FdStream(os.dup(stdin.fileno()))
    receive = trio.lowlevel.FdStream(os.dup(stdout.fileno()))
    stdin.close()
    stdout.close()
    proc.popen.stdin = proc.popen.stdout = None
    return send, receive
