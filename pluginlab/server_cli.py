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
import logging
import os
import signal
import sys
from dataclasses import fields
from typing import Any

from .auth import check_user_id
from .config import FLAG_ENV, ServerConfig
from .messages import MAX_ID

__all__ = ["register"]


_UNITS = {
    "port": "0 = any free port", "path": "must start with /", "db": "'' = no database",
    "max_frame": "bytes", "max_send_buffer": "bytes queued to a member that does not read",
    "jwt_public_key": "PEM text or file (RS/ES); not together with a secret",
    "jwt_algorithm": "HS256 | RS256 | ES256 | ...", "jwt_leeway": "seconds",
    "auth_failure_window": "seconds", "auth_block_seconds": "seconds",
    "auth_max_failures": "0 = never block", "debounce_window": "seconds, 0 = off",
    "connections_per_user": "0 = no limit",
    "max_plugins_per_session": "plugins clients may have in one session; 0 = no limit",
    "max_plugins": "plugins in the server's memory, all sessions; 0 = no limit",
    "plugin_dirs": "folders (':'-separated) clients may load plugin binaries from; unset = "
                   "the standard VST folders; '*' = anywhere (loading a binary runs its code)",
    "jwt_secret_file": "file whose first line is the HS256 secret (kept out of ps and env)",
    "allowed_origins": "comma-separated browser origins (null for file:// pages); unset = "
                       "any; clients sending no Origin are always let in",
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = FLAG_ENV.get(f.name, f"PLUGINLAB_{f.name.upper()}")
        unit = _UNITS.get(f.name) or ("per second, 0 = no limit"
                                      if f.name.endswith("per_second") else None)
        help_text = f"{unit + '; ' if unit else ''}default {f.default!r}; env {env}"
        text = str(f.type)
        if "bool" in text:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif "int" in text and "None" not in text:
            parser.add_argument(flag, dest=f.name, type=int, default=None, help=help_text)
        elif "float" in text:
            parser.add_argument(flag, dest=f.name, type=float, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def _config(args: argparse.Namespace) -> ServerConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(ServerConfig)}
    return ServerConfig.from_env(**overrides)


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM (a second one exits at once: acknowledged changes are
    journaled already). A setting or environment that cannot work is one ``error:`` line
    and exit status 2, not a traceback."""
    from .provenance import JournalBusy, SchemaTooNew
    from .server import PluginServer

    level = (args.log_level or os.environ.get("PLUGINLAB_LOG_LEVEL") or "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return _fail(f"log level must be debug, info, warning or error, got {level.lower()!r}")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # one line per connection and per handshake is noise at info
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        check_user_id(args.token_user)
    except ValueError:
        return _fail(f"token user must be 1 to {MAX_ID} characters (--token-user, "
                     "PLUGINLAB_TOKEN_USER)")
    try:
        config = _config(args)
        server = PluginServer(config)
    except (ValueError, OSError, JournalBusy, SchemaTooNew) as exc:
        return _fail(exc)

    async def run() -> None:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                print("second signal: exiting now (acknowledged changes are journaled; the "
                      "next start stores them)", file=sys.stderr, flush=True)
                os._exit(1)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        _announce(server, config, args.token_user)
        await stop.wait()
        print("shutting down (Ctrl-C again to exit at once)", flush=True)
        await server.stop()

    try:
        asyncio.run(run())
    except OSError as exc:  # could not listen
        return _fail(exc)
    return _report_unindexed(config.db)


def _report_unindexed(db: str | None) -> int:
    """After a stop: 0, or 1 with a note when acknowledged events could not be indexed (a
    full disk): they are safe in the journal, and ``pluginlab db migrate`` stores them."""
    from .provenance import unindexed_events

    try:
        left = unindexed_events(db) if db else 0
    except Exception:  # noqa: BLE001 - the database itself is unreadable: nothing to add
        return 0
    if left:
        print(f"warning: {left} acknowledged event(s) could not be indexed and are only in "
              f"the journal ({db}-daidlog); they are safe: the next start or "
              f"`pluginlab db migrate {db}` stores them", file=sys.stderr)
        return 1
    return 0


def _announce(server: Any, config: ServerConfig, user: str) -> None:
    print(f"pluginlab serving on {server.url}", flush=True)
    if server.generated_secret:
        print("no PLUGINLAB_JWT_SECRET given; generated one for this run (tokens end with "
              "it; set PLUGINLAB_JWT_SECRET or --jwt-secret-file to keep them across "
              "restarts):", flush=True)
        print(f"  PLUGINLAB_JWT_SECRET={server.auth.config.secret}", flush=True)
    if server.auth.config.secret or server.auth.config.private_key:
        print(f"token for {user!r} (1 h): {server.token(user)}", flush=True)
    else:
        print("tokens: pluginlab token USER --jwt-public-key "
              f"{config.jwt_public_key if '-----BEGIN' not in str(config.jwt_public_key) else 'KEY'}"
              " --private-key PRIVATE_KEY.pem", flush=True)
    print(f"database: {config.db or '(none)'}", flush=True)


def cmd_token(args: argparse.Namespace) -> int:
    import jwt

    from .server import build_authenticator

    try:
        config = _config(args)
    except ValueError as exc:
        return _fail(exc)
    if not (config.jwt_secret or config.jwt_secret_file) \
            and not (config.jwt_public_key and args.private_key):
        return _fail("set PLUGINLAB_JWT_SECRET (or --jwt-secret), or give --jwt-public-key "
                     "and --private-key")
    if args.lifetime <= 0:
        return _fail(f"--lifetime must be > 0 seconds, got {args.lifetime}")
    try:
        auth, _ = build_authenticator(config)
    except (ValueError, OSError) as exc:
        return _fail(exc)
    if args.private_key:
        from dataclasses import replace

        key = args.private_key
        if os.path.exists(key):
            with open(key) as fh:
                key = fh.read()
        mismatch = _key_pair_mismatch(key, auth.config.public_key)
        if mismatch:
            return _fail(mismatch)
        auth.config = replace(auth.config, private_key=key)
    kwargs: dict[str, Any] = {"lifetime": args.lifetime}
    if args.session:
        kwargs["sessions"] = args.session
    if args.permission:
        kwargs["permissions"] = args.permission
    try:
        token = auth.issue(args.user, **kwargs)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        return _fail(exc)
    print(json.dumps({"token": token}) if args.json else token)
    return 0


def _key_pair_mismatch(private_pem: str, public_pem: str | None) -> str | None:
    """Why ``private_pem`` cannot sign tokens ``public_pem`` verifies (None: it can): a token
    from a mismatched pair would be refused by the server, after the fact."""
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(private_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        return f"--private-key: not an unencrypted PEM private key ({exc})"
    if public_pem is None:
        return None
    mine = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = serialization.load_pem_public_key(public_pem.encode()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != theirs:
        return ("--private-key does not belong to --jwt-public-key: the server would refuse "
                "its tokens")
    return None


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the WebSocket plugin server")
    _add_config_options(serve)
    serve.add_argument("--token-user", default=os.environ.get("PLUGINLAB_TOKEN_USER") or
                       "researcher",
                       help="user of the ready token printed at start (default researcher; "
                            "env PLUGINLAB_TOKEN_USER)")
    serve.add_argument("--log-level", default=None,
                       help="debug | info (default; refused AUTHs, blocked addresses, errors) "
                            "| warning | error; env PLUGINLAB_LOG_LEVEL")
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
    token.add_argument("--jwt-secret-file", dest="jwt_secret_file", default=None)
    token.add_argument("--jwt-public-key", dest="jwt_public_key", default=None)
    token.add_argument("--jwt-algorithm", dest="jwt_algorithm", default=None)
    token.set_defaults(func=cmd_token)
