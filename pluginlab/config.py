"""Server configuration: one dataclass, filled from constructor arguments, CLI options or env.

Every option ``foo_bar`` is also the environment variable ``PLUGINLAB_FOO_BAR``; the feature
flags keep the user's names (``ENABLE_NEW_PLUGIN_SYSTEM``, ``ENABLE_SESSION_BROADCASTING``,
``ENABLE_DAID_TRACKING``, ``ENABLE_PARAMETER_BATCHING``, ``ALLOW_ANONYMOUS``). The JWT secret is
``PLUGINLAB_JWT_SECRET`` and the database ``PLUGINLAB_DB``. ``PLUGINLAB_RATE_LIMITS=off``
switches every rate limit off (for benchmarks).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["FLAG_ENV", "JWT_ALGORITHMS", "ServerConfig"]

JWT_ALGORITHMS = ("HS256", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
# Limits where 0 means "no limit" (negative values are refused).
_LIMITS = ("messages_per_second", "parameter_changes_per_second", "plugin_ops_per_second",
           "cursor_updates_per_second", "connections_per_user", "auth_max_failures",
           "max_plugins_per_session", "max_plugins")
# Durations in seconds: finite and >= 0.
_SECONDS = ("jwt_leeway", "auth_failure_window", "auth_block_seconds", "debounce_window")

FLAG_ENV = {
    "enable_new_plugin_system": "ENABLE_NEW_PLUGIN_SYSTEM",
    "enable_session_broadcasting": "ENABLE_SESSION_BROADCASTING",
    "enable_daid_tracking": "ENABLE_DAID_TRACKING",
    "enable_parameter_batching": "ENABLE_PARAMETER_BATCHING",
    "allow_anonymous": "ALLOW_ANONYMOUS",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class ServerConfig:
    """All server options with PROTOCOL.md's defaults."""

    host: str = "127.0.0.1"
    port: int = 8000
    path: str = "/ws"
    db: str | None = "pluginlab.sqlite"
    fsync: bool = False
    presets_dir: str | None = None
    strict_paths: bool = False
    # folders (os.pathsep-separated) clients may load plugin binaries from; None = the
    # standard VST folders (pluginlab.vst.default_dirs, with VST_PATH...); "*" = anywhere
    plugin_dirs: str | None = None
    # comma-separated origins browsers may connect from ("http://localhost:3000,null");
    # None = any. Clients that send no Origin header (scripts) are always let in.
    allowed_origins: str | None = None
    # auth
    jwt_secret: str | None = None
    jwt_secret_file: str | None = None  # the secret in a file (not in `ps` or the environment)
    jwt_public_key: str | None = None  # PEM text or a path to a PEM file
    jwt_algorithm: str | None = None
    jwt_leeway: float = 30.0
    auth_max_failures: int = 5
    auth_failure_window: float = 60.0
    auth_block_seconds: float = 300.0
    # limits
    max_frame: int = 1024 * 1024
    max_send_buffer: int = 16 * 1024 * 1024  # bytes queued to a client that does not read
    rate_limits: bool = True
    messages_per_second: int = 100
    parameter_changes_per_second: int = 50
    plugin_ops_per_second: int = 10
    cursor_updates_per_second: int = 30
    connections_per_user: int = 5
    # plugins in memory: each built-in costs ~2.4 MiB (a VST ~0.5 MiB), so one client adding
    # at the plugin-ops limit could fill the RAM; the host's own lab is not counted against
    # the per-session cap
    max_plugins_per_session: int = 64
    max_plugins: int = 512
    debounce_window: float = 0.05
    # feature flags
    enable_new_plugin_system: bool = True
    enable_session_broadcasting: bool = True
    enable_daid_tracking: bool = True
    enable_parameter_batching: bool = True
    allow_anonymous: bool = False

    def __post_init__(self) -> None:
        """Refuse values that cannot work (ValueError naming the option), so a typo fails at
        start-up instead of changing behaviour silently."""
        problems = [p for p in self._problems() if p]
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> list[str]:
        found = []
        for name in _LIMITS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                found.append(f"{name} must be a whole number >= 0 (0 = no limit), got {value!r}")
        for name in _SECONDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value) or value < 0:
                found.append(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        for name in ("max_frame", "max_send_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"{name} must be a number of bytes >= 1, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            found.append(f"port must be 0..65535 (0 = any free port), got {self.port!r}")
        if self.allowed_origins is not None and not self.origins():
            found.append("allowed_origins must name at least one origin "
                         "(e.g. http://localhost:3000)")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            found.append(f"path must start with '/', got {self.path!r}")
        if self.jwt_algorithm is not None and self.jwt_algorithm not in JWT_ALGORITHMS:
            found.append(f"jwt_algorithm must be one of {', '.join(JWT_ALGORITHMS)}, "
                         f"got {self.jwt_algorithm!r}")
        if self.jwt_secret_file is not None:
            if self.jwt_secret:
                found.append("give jwt_secret or jwt_secret_file, not both")
            elif not os.path.isfile(self.jwt_secret_file):
                found.append(f"jwt_secret_file: no such file {self.jwt_secret_file!r}")
        if (self.jwt_secret or self.jwt_secret_file) and self.jwt_public_key:
            found.append("give jwt_secret (HS256) or jwt_public_key (RS/ES), not both")
        elif self.jwt_algorithm and self.jwt_algorithm.startswith("HS") and self.jwt_public_key:
            found.append(f"jwt_algorithm {self.jwt_algorithm} needs a secret, not a public key")
        elif self.jwt_algorithm and not self.jwt_algorithm.startswith("HS") \
                and not self.jwt_public_key:
            found.append(f"jwt_algorithm {self.jwt_algorithm} needs jwt_public_key")
        return found

    def secret(self) -> str | None:
        """The HS256 secret: ``jwt_secret``, or the first line of ``jwt_secret_file``."""
        if self.jwt_secret_file is None:
            return self.jwt_secret
        with open(self.jwt_secret_file, encoding="utf-8") as fh:
            secret = fh.readline().strip()
        if not secret:
            raise ValueError(f"jwt_secret_file {self.jwt_secret_file!r} is empty")
        return secret

    def plugin_folders(self) -> list[Path] | None:
        """Resolved folders remote clients may load binaries from (None = anywhere)."""
        if self.plugin_dirs is not None and self.plugin_dirs.strip() == "*":
            return None
        if self.plugin_dirs is None:
            from .vst import default_dirs

            folders = default_dirs()
        else:
            folders = [Path(p) for p in self.plugin_dirs.split(os.pathsep) if p.strip()]
        out = []  # as written and resolved: a symlinked folder matches either way
        for folder in folders:
            out += [Path(os.path.abspath(folder.expanduser())),
                    Path(os.path.realpath(folder.expanduser()))]
        return list(dict.fromkeys(out))

    def origins(self) -> frozenset[str] | None:
        """The allowed browser origins (None = any)."""
        if self.allowed_origins is None:
            return None
        return frozenset(o.strip().rstrip("/") for o in str(self.allowed_origins).split(",")
                         if o.strip())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Defaults, then environment variables, then ``overrides`` (None values ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = FLAG_ENV.get(f.name, f"PLUGINLAB_{f.name.upper()}")
            if name in env:
                values[f.name] = _convert(f.name, env[name], cls.__dataclass_fields__[f.name].type)
        if "PLUGINLAB_RATE_LIMITS" in env:
            values["rate_limits"] = _convert("rate_limits", env["PLUGINLAB_RATE_LIMITS"], "bool")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _convert(name: str, raw: str, type_name: Any) -> Any:
    text = str(type_name)
    if "bool" in text:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{name}: expected true/false, got {raw!r}")
    try:
        if "int" in text and "None" not in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    return raw
