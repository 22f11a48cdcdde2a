"""Unix-socket RPC server for trainers and the CLI (protocol: meshmerge.proto.rpc).

One task per connection inside the server's nursery; requests on a
connection are answered in order. File descriptors arrive as SCM_RIGHTS with
a request's frame and are closed when the request finishes, whatever
happens. A malformed frame closes the connection (the peer broke framing);
a bad request gets an error response and the connection stays usable.
"""

from __future__ import annotations

import array
import logging
import os
import socket as stdsocket
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from meshmerge.daemon.node import Node
from meshmerge.proto import cid as cids
from meshmerge.proto.cbor import CodecError
from meshmerge.proto.messages import SetSchema
from meshmerge.proto.peerid import to_base58
from meshmerge.proto.rpc import (
    MAX_FDS_PER_REQUEST,
    FrameReader,
    ProtocolError,
    Request,
    Response,
    RpcError,
    parse_request,
)

if TYPE_CHECKING:
    # the trio-stubs that py-libp2p pulls in (trio-typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("meshmerge.rpc")

Handler = Callable[["Call"], Awaitable[Any]]


class Call:
    """One request being served: its params and the descriptors that came with it."""

    def __init__(self, request: Request, fds: list[int]) -> None:
        self.request = request
        self.params = request.params
        self.fds = fds

    def param(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.params:
            if default is ...:
                raise RpcError("bad_request", f"missing parameter {name!r}")
            return default
        value = self.params[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise RpcError("bad_request", f"parameter {name!r} has the wrong type ({type(value).__name__})")
        return value

    def fd(self, name: str) -> int | None:
        index: int | None = self.param(name, int, None)
        if index is None:
            return None
        if not 0 <= index < len(self.fds):
            raise RpcError("bad_request", f"{name} refers to descriptor {index}, but {len(self.fds)} came")
        return self.fds[index]


def read_fd(fd: int, limit: int) -> bytes:
    """Read a regular file or pipe from its start (files) to EOF, refusing more than `limit` bytes."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        if st.st_size > limit:
            raise RpcError("too_large", f"input is {st.st_size} bytes, the limit is {limit}")
        os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise RpcError("too_large", f"input exceeds the limit of {limit} bytes")
        chunks.append(chunk)


def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class RpcServer:
    def __init__(
        self,
        node: Node,
        path: Path,
        *,
        mode: int = 0o660,
        max_frame_bytes: int = 64 * 1024 * 1024,
        max_connections: int = 64,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_request(method, outcome)`` is told of every answered request (metrics)."""
        self.node = node
        self.on_request = on_request
        self.path = path
        self.mode = mode
        self.max_frame_bytes = max_frame_bytes
        self.connections = trio.Semaphore(max_connections)
        self.methods: dict[str, Handler] = {
            "status": self._status,
            "sets.create": self._sets_create,
            "sets.list": self._sets_list,
            "sets.show": self._sets_show,
            "sets.leave": self._sets_leave,
            "sets.rejoin": self._sets_rejoin,
            "contribute": self._contribute,
            "remove": self._remove,
            "contributions": self._contributions,
            "merge": self._merge,
            "blocklist": self._blocklist,
            "gc": self._gc,
        }

    def register(self, name: str, handler: Handler) -> None:
        """Network services add their methods (peers, scores, dht, …)."""
        if name in self.methods:
            raise ValueError(f"RPC method {name!r} registered twice")
        self.methods[name] = handler

    async def serve(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.bind(str(self.path))
            os.chmod(self.path, self.mode)
            sock.listen(64)
            log.info("RPC listening on %s (mode %o)", self.path, self.mode)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    if self.connections.value == 0:
                        log.warning(
                            "RPC connection refused: %d connections already open", self.connections.value
                        )
                        conn.close()
                        continue
                    nursery.start_soon(self._connection, conn)
        finally:
            sock.close()
            self.path.unlink(missing_ok=True)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        async with self.connections:
            reader = FrameReader(self.max_frame_bytes)
            fds: deque[int] = deque()
            try:
                while True:
                    data, ancdata, flags, _ = await conn.recvmsg(
                        1 << 16, stdsocket.CMSG_SPACE(MAX_FDS_PER_REQUEST * array.array("i").itemsize)
                    )
                    fds.extend(_received_fds(ancdata))
                    if flags & stdsocket.MSG_CTRUNC:
                        raise ProtocolError("too many descriptors in one message")
                    if not data:
                        return
                    for body in reader.feed(data):
                        await self._serve_one(conn, body, fds)
            except ProtocolError as exc:
                log.warning("RPC client broke the protocol: %s; closing its connection", exc)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                while fds:
                    os.close(fds.popleft())
                conn.close()

    async def _serve_one(self, conn: trio.socket.SocketType, body: dict[str, Any], fds: deque[int]) -> None:
        raw_id = body.get("id")
        rid = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else 0
        taken: list[int] = []
        try:
            request = parse_request(body)
            if request.fds > len(fds):
                raise ProtocolError(
                    f"request {request.id} announced {request.fds} descriptors, {len(fds)} came"
                )
            taken = [fds.popleft() for _ in range(request.fds)]
            handler = self.methods.get(request.method)
            if handler is None:
                raise RpcError(
                    "unknown_method", f"no method {request.method!r}; valid: {sorted(self.methods)}"
                )
            result = await handler(Call(request, taken))
            response = Response(request.id, True, result)
        except RpcError as exc:
            response = Response(rid, False, error_code=exc.code, error_message=exc.message)
        except ProtocolError:
            raise
        except Exception as exc:
            log.exception("RPC method failed")
            response = Response(
                rid, False, error_code="internal", error_message=f"{type(exc).__name__}: {exc}"
            )
        finally:
            for fd in taken:
                os.close(fd)
        if self.on_request is not None:
            method = body.get("method")
            known = method if isinstance(method, str) and method in self.methods else "unknown"
            self.on_request(known, "ok" if response.ok else response.error_code)
        await _send_all(conn, response.to_frame())

    # -- methods -----------------------------------------------------------------------

    async def _status(self, call: Call) -> Any:
        return self.node.status()

    async def _sets_create(self, call: Call) -> Any:
        try:
            schema = SetSchema.from_obj(call.param("schema", dict))
        except CodecError as exc:
            raise RpcError("bad_schema", str(exc)) from None
        set_id = await self.node.create_set(schema)
        return {"id": cids.to_text(set_id), "name": schema.name}

    async def _sets_list(self, call: Call) -> Any:
        return self.node.summaries()

    async def _sets_show(self, call: Call) -> Any:
        handle = self.node.resolve_set(call.param("set", str))
        return {**self.node.set_summary(handle), "schema": handle.state.schema.to_obj()}

    async def _sets_leave(self, call: Call) -> Any:
        return await self.node.leave_set(call.param("set", str))

    async def _sets_rejoin(self, call: Call) -> Any:
        return await self.node.rejoin_set(call.param("set", str))

    async def _contribute(self, call: Call) -> Any:
        limit = self.node.max_blob_bytes
        fd = call.fd("input_fd")
        if fd is not None:
            data = await trio.to_thread.run_sync(read_fd, fd, limit)
        else:
            data = call.param("data", bytes)
        weight = call.param("weight", int, 1)
        if not 1 <= weight <= 2**53:
            raise RpcError("bad_request", "weight must be an integer in 1..2**53")
        meta = call.param("meta", dict, {})
        return await self.node.contribute(call.param("set", str), data, weight=weight, meta=meta)

    async def _gc(self, call: Call) -> Any:
        return await self.node.gc()

    async def _remove(self, call: Call) -> Any:
        return await self.node.remove(call.param("set", str), call.param("id", str))

    async def _blocklist(self, call: Call) -> Any:
        """Authors convicted by verifiable evidence (equivocation), per merge set."""
        rows = []
        for set_id in self.node.set_ids():
            state = self.node.state(set_id)
            if state is None:
                continue
            for author, evidence in sorted(state.orset.convictions().items()):
                rows.append(
                    {
                        "peer": to_base58(author),
                        "set": state.schema.name,
                        "reason": "equivocation",
                        "evidence": cids.to_text(evidence),
                    }
                )
        return rows

    async def _contributions(self, call: Call) -> Any:
        return self.node.contributions(call.param("set", str))

    async def _merge(self, call: Call) -> Any:
        strategy = call.param("strategy", str, None)
        params = call.param("params", dict, None)
        summary, data = await self.node.merged(call.param("set", str), strategy, params)
        fd = call.fd("output_fd")
        if fd is not None:
            await trio.to_thread.run_sync(write_fd, fd, data)
        elif call.param("inline", bool, False):
            if len(data) > self.max_frame_bytes - 4096:
                raise RpcError(
                    "too_large", "merged model exceeds the frame limit; pass an output file descriptor"
                )
            summary["data"] = data
        return summary


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]
