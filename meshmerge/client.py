"""Trainer-side client for the local meshmerge daemon.

``Client`` is blocking (plain sockets); ``AsyncClient`` offers the same calls
to asyncio code by running them on a worker thread (use :func:`run` to get
uvloop when it is installed). Tensors go to the daemon as an open file
descriptor when you pass a path, so large models are never copied through the
socket buffer; merged models come back the same way.

    with Client() as c:
        c.create_set(name="llama-lora/round-17", kind="lora", tensors={...})
        c.contribute("llama-lora/round-17", "adapter.safetensors", weight=1200)
        summary = c.merge("llama-lora/round-17", output="merged.safetensors")
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshmerge.proto.messages import SetSchema, TensorEntry
from meshmerge.proto.rpc import FrameReader, Request, RpcError, parse_response

DEFAULT_SOCKET = Path(os.environ.get("MESHMERGE_SOCKET", "/run/meshmerge/rpc.sock"))
T = TypeVar("T")

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "Client", "DaemonUnavailable", "RpcError", "run"]


class DaemonUnavailable(ConnectionError):
    """No daemon answers on the socket."""


class Client:
    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET, *, timeout: float = 600.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = FrameReader(max_frame_bytes=1 << 31)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise DaemonUnavailable(
                    f"no meshmerge daemon at {self.path} ({exc.strerror}); is it running? (systemctl status meshmerge)"
                ) from None
            except PermissionError:
                sock.close()
                raise DaemonUnavailable(
                    f"permission denied on {self.path}: join the socket's group (meshmerge) or run as its owner"
                ) from None
            self._sock = sock
        return self._sock

    def call(self, method: str, params: Mapping[str, Any] | None = None, fds: list[int] | None = None) -> Any:
        """Send one request and wait for its response; raises RpcError on an error response."""
        fds = fds or []
        with self._lock:
            sock = self._connect()
            request = Request(next(self._ids), method, dict(params or {}), len(fds))
            data = request.to_frame()
            try:
                if fds:
                    sent = socket.send_fds(sock, [data[:1]], fds)
                    sock.sendall(data[sent:])
                else:
                    sock.sendall(data)
                while True:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        self.close()
                        raise DaemonUnavailable("the daemon closed the connection")
                    frames = self._reader.feed(chunk)
                    if frames:
                        response = parse_response(frames[0])
                        return response.unwrap()
            except (OSError, TimeoutError):
                self.close()
                raise

    # -- convenience ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def create_set(
        self,
        name: str,
        tensors: Mapping[str, tuple[str, tuple[int, ...]]],
        *,
        kind: str = "weights",
        strategy: str = "linear",
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Define a merge set: ``tensors`` maps name -> (dtype, shape)."""
        schema = SetSchema(
            name=name,
            kind=kind,
            tensors=tuple(TensorEntry(n, d, tuple(s)) for n, (d, s) in sorted(tensors.items())),
            strategy=strategy,
            params=dict(params or {}),
        )
        return dict(self.call("sets.create", {"schema": schema.to_obj()}))

    def sets(self) -> list[dict[str, Any]]:
        return list(self.call("sets.list"))

    def leave_set(self, merge_set: str) -> dict[str, Any]:
        """Stop following a set here (its operations and blobs are deleted locally)."""
        return dict(self.call("sets.leave", {"set": merge_set}))

    def rejoin_set(self, merge_set: str) -> dict[str, Any]:
        return dict(self.call("sets.rejoin", {"set": merge_set}))

    def contribute(
        self,
        merge_set: str,
        tensors: Path | str | bytes,
        *,
        weight: int = 1,
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Contribute a safetensors file (path, passed as a descriptor) or its bytes."""
        params: dict[str, Any] = {"set": merge_set, "weight": weight, "meta": dict(meta or {})}
        if isinstance(tensors, bytes):
            return dict(self.call("contribute", {**params, "data": tensors}))
        fd = os.open(tensors, os.O_RDONLY)
        try:
            return dict(self.call("contribute", {**params, "input_fd": 0}, [fd]))
        finally:
            os.close(fd)

    def remove(self, merge_set: str, contribution: str) -> dict[str, Any]:
        return dict(self.call("remove", {"set": merge_set, "id": contribution}))

    def gc(self) -> dict[str, Any]:
        """Collect tensor blobs no live contribution references; returns what was freed."""
        return dict(self.call("gc"))

    def contributions(self, merge_set: str) -> list[dict[str, Any]]:
        return list(self.call("contributions", {"set": merge_set}))

    def merge(
        self,
        merge_set: str,
        *,
        output: Path | str | None = None,
        strategy: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Merge the live set. With `output`, the safetensors file is written there;
        otherwise the bytes come back inline under "data"."""
        request: dict[str, Any] = {"set": merge_set}
        if strategy is not None:
            request["strategy"] = strategy
        if params is not None:
            request["params"] = dict(params)
        if output is None:
            return dict(self.call("merge", {**request, "inline": True}))
        out = Path(output)
        tmp = out.with_name(f".{out.name}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            summary = dict(self.call("merge", {**request, "output_fd": 0}, [fd]))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, out)
        summary["path"] = str(out)
        return summary


class AsyncClient:
    """The same calls for asyncio code; each runs on a worker thread."""

    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET, *, timeout: float = 600.0) -> None:
        self._sync = Client(socket_path, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sync.close()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._sync, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result
