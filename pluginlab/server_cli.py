"""``pluginlab serve`` and ``pluginlab token``.

``serve`` exposes every :class:`~pluginlab.config.ServerConfig` option as ``--option-name``
(booleans as ``--flag`` / ``--no-flag``); unset options fall back to ``PLUGINLAB_*`` / feature
flag environment variables, then to the defaults. It prints the URL and a ready token, and
shuts down cleanly on Ctrl-C / SIGTERM (pending broadcasts flushed, store closed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import fields
from typing import Any

from .config import ServerConfig

__all__ = ["register"]


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        text = str(f.type)
        if "bool" in text:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None)
        elif "int" in text and "None" not in text:
            parser.add_argument(flag, dest=f.name, type=int, default=None)
        elif "float" in text:
            parser.add_argument(flag, dest=f.name, type=float, default=None)
        else:
            parser.add_argument(flag, dest=f.name, default=None)


def _config(args: argparse.Namespace) -> ServerConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(ServerConfig)}
    return ServerConfig.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import PluginServer

    config = _config(args)

    async def run() -> None:
        server = await PluginServer(config).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        user = args.token_user
        print(f"pluginlab serving on {server.url}", flush=True)
        if server.generated_secret:
            print("no PLUGINLAB_JWT_SECRET given; generated one for this run:", flush=True)
            print(f"  PLUGINLAB_JWT_SECRET={server.auth.config.secret}", flush=True)
        if server.auth.config.secret or server.auth.config.private_key:
            print(f"token for {user!r} (1 h): {server.token(user)}", flush=True)
        print(f"database: {config.db or '(none)'}", flush=True)
        await stop.wait()
        print("shutting down", flush=True)
        await server.stop()

    asyncio.run(run())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .server import build_authenticator

    config = _config(args)
    if not config.jwt_secret and not (config.jwt_public_key and args.private_key):
        print("error: set PLUGINLAB_JWT_SECRET (or --jwt-secret), or give --jwt-public-key "
              "and --private-key", file=sys.stderr)
        return 2
    auth, _ = build_authenticator(config)
    if args.private_key:
        from dataclasses import replace

        key = args.private_key
        if os.path.exists(key):
            with open(key) as fh:
                key = fh.read()
        auth.config = replace(auth.config, private_key=key)
    kwargs: dict[str, Any] = {"lifetime": args.lifetime}
    if args.session:
        kwargs["sessions"] = args.session
    if args.permission:
        kwargs["permissions"] = args.permission
    try:
        token = auth.issue(args.user, **kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"token": token}) if args.json else token)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the WebSocket plugin server")
    _add_config_options(serve)
    serve.add_argument("--token-user", default="researcher",
                       help="user of the ready token printed at start")
    serve.set_defaults(func=cmd_serve)
    token = sub.add_parser("token", help="issue a JWT for the server")
    token.add_argument("user")
    token.add_argument("--session", action="append", help="allowed session id (repeatable)")
    token.add_argument("--permission", action="append",
                       help="plugin:read | plugin:write | plugin:add | plugin:remove")
    token.add_argument("--lifetime", type=float, default=3600.0, help="seconds")
    token.add_argument("--private-key", help="PEM (or path) for RS256/ES256 tokens")
    token.add_argument("--json", action="store_true")
    token.add_argument("--jwt-secret", dest="jwt_secret", default=None)
    token.add_argument("--jwt-public-key", dest="jwt_public_key", default=None)
    token.add_argument("--jwt-algorithm", dest="jwt_algorithm", default=None)
    token.set_defaults(func=cmd_token)
