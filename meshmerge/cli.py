"""`meshmerge` command: run the daemon, or inspect and drive one over its socket.

Every inspection command prints a human table by default and the raw result
with ``--json``. Exit status: 0 ok, 1 the daemon reported an error, 2 usage
or connection problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshmerge.client import DEFAULT_SOCKET, Client, DaemonUnavailable, RpcError


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


def _parse_value(text: str) -> Any:
    """CLI parameter values: JSON when it parses (numbers, true/false, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"meshmerge: --param takes key=value, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def _print(args: argparse.Namespace, result: Any, columns: Sequence[str] | None = None) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))
    elif columns is not None:
        print(_table(result, columns))
    elif isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            print(
                f"{key:<{width}}  {_cell(value) if not isinstance(value, (dict, list)) else json.dumps(value)}"
            )
    else:
        print(result)


def cmd_daemon(args: argparse.Namespace) -> int:
    import tempfile

    import trio

    from meshmerge.daemon.config import Config, ConfigError, dev_config
    from meshmerge.daemon.gctune import GcParams
    from meshmerge.daemon.main import NetworkStarter, run, setup_logging

    try:
        if args.dev:
            base = Path(args.dev) if args.dev != "tmp" else Path(tempfile.mkdtemp(prefix="meshmerge-dev-"))
            config = dev_config(base, listen_port=args.port or 0, bootstrap=tuple(args.bootstrap))
        else:
            config = Config.load(Path(args.config))
    except ConfigError as exc:
        print(f"meshmerge: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.node.log_level, args.log_format)
    network: NetworkStarter | None = None
    if not args.no_network:
        from meshmerge.daemon.network import start_network

        network = start_network
    trio.run(lambda: run(config, network=network, gc_params=GcParams()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshmerge", description="meshmerge node and control tool")
    parser.add_argument(
        "--socket", default=str(DEFAULT_SOCKET), help="daemon RPC socket (env MESHMERGE_SOCKET)"
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="run the node")
    d.add_argument("--config", default="/etc/meshmerge/config.toml")
    d.add_argument(
        "--dev", metavar="DIR", help="loopback-only dev node with state in DIR ('tmp' for a fresh one)"
    )
    d.add_argument("--port", type=int, help="with --dev: TCP port to listen on (default: any)")
    d.add_argument(
        "--bootstrap", action="append", default=[], metavar="MULTIADDR", help="with --dev: peer to dial first"
    )
    d.add_argument("--no-network", action="store_true", help="serve RPC only, no libp2p (local testing)")
    d.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    d.add_argument("--log-format", choices=["text", "json"], default="text")

    sub.add_parser("id", help="this node's peer id")
    sub.add_parser("status", help="node status (with blob bytes and quota)")
    sub.add_parser("gc", help="delete tensor blobs no live contribution references")
    for name, help_text in (
        ("peers", "connected peers"),
        ("scores", "gossip peer scores"),
        ("topics", "gossip topics and mesh sizes"),
        ("dht", "DHT routing table summary"),
        ("blocklist", "convicted and blocked peers"),
    ):
        sub.add_parser(name, help=help_text)

    sets = sub.add_parser("sets", help="list merge sets, or create one")
    sets_sub = sets.add_subparsers(dest="sets_command")
    create = sets_sub.add_parser("create", help="define a merge set from a template safetensors file")
    create.add_argument("name")
    create.add_argument(
        "--like", required=True, help="safetensors file whose tensor names/dtypes/shapes to use"
    )
    create.add_argument("--kind", choices=["weights", "delta", "lora"], default="weights")
    create.add_argument("--strategy", default="linear")
    create.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    show = sets_sub.add_parser("show", help="one merge set with its schema")
    show.add_argument("set")
    leave = sets_sub.add_parser(
        "leave", help="stop following a merge set here: delete its operations and tensors locally"
    )
    leave.add_argument("set")
    rejoin = sets_sub.add_parser("rejoin", help="follow a merge set this node left again")
    rejoin.add_argument("set", help="id or name of the left set")

    c = sub.add_parser("contribute", help="contribute a safetensors file to a merge set")
    c.add_argument("set")
    c.add_argument("file")
    c.add_argument("--weight", type=int, default=1)
    c.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")

    r = sub.add_parser("remove", help="retract one of this node's contributions")
    r.add_argument("set")
    r.add_argument("id")

    lc = sub.add_parser("contributions", help="contributions known for a merge set")
    lc.add_argument("set")

    m = sub.add_parser("merge", help="compute the merged model")
    m.add_argument("set")
    m.add_argument("-o", "--output", help="write the merged safetensors file here")
    m.add_argument("--strategy")
    m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    if args.command == "daemon":
        return cmd_daemon(args)
    try:
        with Client(args.socket) as client:
            return _dispatch(args, client)
    except DaemonUnavailable as exc:
        print(f"meshmerge: {exc}", file=sys.stderr)
        return 2
    except RpcError as exc:
        print(f"meshmerge: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, client: Client) -> int:
    cmd = args.command
    if cmd == "id":
        status = client.status()
        print(json.dumps({"peer_id": status["peer_id"]}) if args.json else status["peer_id"])
    elif cmd == "status":
        _print(args, client.status())
    elif cmd == "gc":
        _print(args, client.gc())
    elif cmd in ("peers", "scores", "topics", "dht", "blocklist"):
        result = client.call(cmd)
        columns = (
            list(result[0]) if isinstance(result, list) and result and isinstance(result[0], dict) else None
        )
        _print(args, result, columns)
    elif cmd == "sets":
        if args.sets_command == "create":
            from meshmerge.crdt import tensorfile

            arrays, dtypes = tensorfile.loads(Path(args.like).read_bytes())
            spec = {name: (dtypes[name], tuple(a.shape)) for name, a in arrays.items()}
            _print(
                args,
                client.create_set(
                    args.name, spec, kind=args.kind, strategy=args.strategy, params=_params(args.param)
                ),
            )
        elif args.sets_command == "show":
            _print(args, client.call("sets.show", {"set": args.set}))
        elif args.sets_command == "leave":
            _print(args, client.leave_set(args.set))
        elif args.sets_command == "rejoin":
            _print(args, client.rejoin_set(args.set))
        else:
            _print(
                args,
                client.sets(),
                ["name", "id", "kind", "strategy", "live", "complete", "convicted", "root"],
            )
    elif cmd == "contribute":
        _print(args, client.contribute(args.set, args.file, weight=args.weight, meta=_params(args.meta)))
    elif cmd == "remove":
        _print(args, client.remove(args.set, args.id))
    elif cmd == "contributions":
        _print(
            args, client.contributions(args.set), ["id", "author", "seq", "weight", "live", "have_tensors"]
        )
    elif cmd == "merge":
        summary = client.merge(
            args.set, output=args.output, strategy=args.strategy, params=_params(args.param) or None
        )
        summary.pop("data", None)
        _print(args, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
