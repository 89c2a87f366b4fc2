"""The `pigeon` command: serve, manage users, chat in a terminal."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from pigeon.auth import Passwords
from pigeon.config import Config, from_env
from pigeon.runtime import tune_gc_for_serving
from pigeon.server import build_server, open_bus, open_store
from pigeon.store.errors import Conflict


def _config(args: argparse.Namespace) -> Config:
    config = from_env()
    overrides: dict[str, object] = {}
    for name in ("host", "port", "store_url", "bus_url", "workers", "gateway_id"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = Path(args.data_dir)
    return replace(config, **overrides)  # type: ignore[arg-type]


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


async def serve(config: Config) -> None:
    server = build_server(config)
    await server.start()
    tune_gc_for_serving()
    print(f"Pigeon is listening on {server.url} (gateway {server.gateway_id})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Pigeon is shutting down: draining connections", flush=True)
    await server.stop()


async def add_user(config: Config, username: str, password: str, display_name: str | None) -> int:
    store = open_store(config)
    await store.open()
    try:
        password_hash = await asyncio.to_thread(Passwords().hash, password)
        user = await store.create_user(username, display_name or username, password_hash)
    except Conflict:
        print(f"user {username!r} already exists", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"created user {user.username} (id {user.id})")
    return 0


async def list_users(config: Config) -> int:
    store = open_store(config)
    await store.open()
    try:
        for user in await store.list_users():
            print(f"{user.id}\t{user.username}\t{user.display_name}")
    finally:
        await store.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigeon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="where the embedded store lives (./pigeon-data)")
        p.add_argument("--store", dest="store_url", help="store URL (default: SQLite in data dir)")

    serve_p = sub.add_parser("serve", help="run Pigeon (gateway, worker, embedded store)")
    serve_p.add_argument("--host")
    serve_p.add_argument("--port", type=int)
    serve_p.add_argument("--bus", dest="bus_url", help="bus URL (default: in-process)")
    serve_p.add_argument("--workers", type=int, help="in-process fan-out workers (default 1)")
    serve_p.add_argument("--gateway-id")
    server_flags(serve_p)

    user_p = sub.add_parser("user", help="manage users")
    user_sub = user_p.add_subparsers(dest="user_command", required=True)
    add_p = user_sub.add_parser("add", help="create a user")
    add_p.add_argument("username")
    add_p.add_argument("--display-name")
    add_p.add_argument("--password", help="(prompted for if not given)")
    server_flags(add_p)
    list_p = user_sub.add_parser("list", help="list users")
    server_flags(list_p)

    worker_p = sub.add_parser("worker", help="run fan-out workers only (gateways use --workers 0)")
    worker_p.add_argument("--workers", type=int, default=1, help="fan-out workers (default 1)")
    worker_p.add_argument("--bus", dest="bus_url", help="bus URL, e.g. redis://host:6379/0")
    server_flags(worker_p)

    cluster_p = sub.add_parser(
        "cluster", help="a local scaled set-up (PostgreSQL, Redis, processes)"
    )
    cluster_sub = cluster_p.add_subparsers(dest="cluster_command", required=True)
    up_p = cluster_sub.add_parser("up", help="start it and run until Ctrl-C or `cluster down`")
    up_p.add_argument("--gateways", type=int, default=3)
    up_p.add_argument("--workers", type=int, default=2)
    up_p.add_argument("--base-port", type=int, help="gateways on this port and the next ones")
    down_p = cluster_sub.add_parser("down", help="stop the cluster started from --dir")
    for p in (up_p, down_p):
        p.add_argument("--dir", default="pigeon-cluster", help="state and logs (./pigeon-cluster)")

    chat_p = sub.add_parser("chat", help="chat in the terminal")
    chat_p.add_argument("--url", default="http://127.0.0.1:8080")
    chat_p.add_argument("--username", required=True)
    chat_p.add_argument("--password", help="(prompted for if not given)")
    chat_p.add_argument("--register", action="store_true", help="create the account first")
    chat_p.add_argument("--display-name")

    from pigeon.bench.runner import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="benchmarks (docs/benchmarks.md)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        _run(serve(_config(args)))
        return 0
    if args.command == "worker":
        from pigeon.worker.process import WorkerProcess, run_worker_process

        config = _config(args)
        process = WorkerProcess(config, open_store(config), open_bus(config), args.workers)
        _run(run_worker_process(process))
        return 0
    if args.command == "user":
        config = _config(args)
        if args.user_command == "add":
            password = args.password or getpass.getpass("password: ")
            code = 0

            async def run_add() -> None:
                nonlocal code
                code = await add_user(config, args.username, password, args.display_name)

            _run(run_add())
            return code
        _run(list_users(config))
        return 0
    if args.command == "bench":
        from pigeon.bench.runner import main as bench_main

        return bench_main(args)
    if args.command == "cluster":
        from pigeon.devcluster.command import cluster_down, cluster_up

        root = Path(args.dir).absolute()
        if args.cluster_command == "down":
            return cluster_down(root)
        _run(cluster_up(root, args.gateways, args.workers, args.base_port))
        return 0
    if args.command == "chat":
        from pigeon.client.chat import run_chat

        password = args.password or getpass.getpass("password: ")
        _run(
            run_chat(
                args.url,
                args.username,
                password,
                register=args.register,
                display_name=args.display_name,
                input_stream=sys.stdin,
                output_stream=sys.stdout,
            )
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
