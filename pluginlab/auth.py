"""Authentication and authorization: JWT verification (PyJWT), permissions, failure blocking.

Contracts (PROTOCOL.md, *Authentication and authorization*):

* HS256 with a shared secret by default; RS256/ES256 with a PEM public key when configured.
  Only the configured family is accepted, so ``alg:none`` and HS/RS confusion are refused.
* ``exp`` is required; leeway 30 s by default. The user is ``sub`` (or ``user_id``/``userId``).
* Optional claims: ``sessions`` (list of joinable session ids) and ``scope``/``permissions``
  (space-separated string or list). Missing claim = everything allowed.
* Repeated failures from one address (``max_failures`` within ``failure_window`` s) block that
  address for ``block_seconds``; a success resets its count.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt

from .errors import AuthFailed
from .messages import MAX_ID

__all__ = ["PERMISSIONS", "AuthConfig", "Authenticator", "Identity", "generate_secret"]

PERMISSIONS = ("plugin:read", "plugin:write", "plugin:add", "plugin:remove")
log = logging.getLogger("pluginlab.auth")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")


def generate_secret() -> str:
    """A random HS256 secret (printed by ``pluginlab serve`` when none is configured)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AuthConfig:
    """Verification settings. Give ``secret`` (HS256) or ``public_key`` (RS256/ES256)."""

    secret: str | None = None
    public_key: str | None = None
    private_key: str | None = None  # only to issue asymmetric tokens (tests, `pluginlab token`)
    algorithm: str | None = None
    leeway: float = 30.0
    max_failures: int = 5
    failure_window: float = 60.0
    block_seconds: float = 300.0

    def algorithms(self) -> list[str]:
        if self.public_key:
            return [self.algorithm or "RS256"] if self.algorithm else ["RS256", "ES256"]
        return ["HS256"]


@dataclass(frozen=True)
class Identity:
    """An authenticated user and what the token allows."""

    user_id: str
    sessions: tuple[str, ...] | None = None
    permissions: frozenset[str] | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    def allows(self, permission: str) -> bool:
        return self.permissions is None or permission in self.permissions

    def may_join(self, session_id: str) -> bool:
        return self.sessions is None or session_id in self.sessions


def check_user_id(user_id: object) -> None:
    """ValueError unless ``user_id`` is 1 to 128 characters of text (the id limit: it is
    copied into every message and event of its user)."""
    if not isinstance(user_id, str) or not 0 < len(user_id) <= MAX_ID:
        raise ValueError(f"user_id must be 1 to {MAX_ID} characters")


class Authenticator:
    """Verifies tokens and tracks failures per address. Thread-safe."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        if not config.secret and not config.public_key:
            raise ValueError("AuthConfig needs a secret (HS256) or a public key (RS256/ES256)")
        self.config = config
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- tokens -----------------------------------------------------------------------------
    def verify(self, token: Any, claimed_user_id: Any = None) -> Identity:
        """The identity in ``token``; raises AuthFailed with a reason otherwise."""
        if not isinstance(token, str) or not token:
            raise AuthFailed("missing token")
        key = self.config.public_key or self.config.secret or ""
        try:
            claims = jwt.decode(
                token, key, algorithms=self.config.algorithms(), leeway=self.config.leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailed("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailed(f"token lacks claim {exc.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise AuthFailed("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise AuthFailed("bad signature") from None
        except jwt.InvalidKeyError:  # PyJWT's text shows internals (a generator's repr)
            raise AuthFailed("token signed for another kind of key") from None
        except jwt.PyJWTError as exc:
            raise AuthFailed(f"invalid token: {exc}") from None
        user = claims.get("sub") or claims.get("user_id") or claims.get("userId")
        if not isinstance(user, str) or not user:
            raise AuthFailed("token has no subject")
        if len(user) > MAX_ID:  # it is copied into every message and event of the user
            raise AuthFailed(f"token subject longer than {MAX_ID} characters")
        if claimed_user_id not in (None, "") and claimed_user_id != user:
            raise AuthFailed("user_id does not match token subject")
        return Identity(user, _sessions(claims), _permissions(claims), claims)

    def issue(
        self,
        user_id: str,
        *,
        sessions: Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
        lifetime: float = 3600.0,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A signed token for ``user_id`` valid for ``lifetime`` seconds.

        Unknown permissions, and a ``user_id`` that is empty or longer than 128 characters,
        raise ValueError. With a public key the algorithm is the configured one, else the
        private key's (RS256 for RSA, ES256 for EC P-256).
        """
        check_user_id(user_id)
        unknown = sorted(set(permissions or ()) - set(PERMISSIONS))
        if unknown:
            raise ValueError(f"unknown permission(s) {', '.join(unknown)}; "
                             f"known: {', '.join(PERMISSIONS)}")
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(lifetime)}
        if sessions is not None:
            claims["sessions"] = list(sessions)
        if permissions is not None:
            claims["permissions"] = list(permissions)
        claims.update(extra or {})
        if self.config.public_key:
            if not self.config.private_key:
                raise ValueError("issuing asymmetric tokens needs private_key")
            algorithm = self.config.algorithm or _algorithm_of(self.config.private_key)
            return jwt.encode(claims, self.config.private_key, algorithm=algorithm)
        return jwt.encode(claims, self.config.secret or "", algorithm="HS256")

    # -- failure blocking -------------------------------------------------------------------
    def check_blocked(self, address: str) -> None:
        """Raise AuthFailed("blocked", retry_after=...) while ``address`` is blocked."""
        with self._lock:
            until = self._blocked_until.get(address, 0.0)
            now = self._clock()
            if until > now:
                raise AuthFailed("blocked", retry_after=round(until - now, 3))
            self._blocked_until.pop(address, None)

    def record_failure(self, address: str) -> None:
        with self._lock:
            now = self._clock()
            window = self._failures.setdefault(address, deque())
            window.append(now)
            while window and window[0] <= now - self.config.failure_window:
                window.popleft()
            if 0 < self.config.max_failures <= len(window):  # 0: never block
                self._blocked_until[address] = now + self.config.block_seconds
                log.warning("address %s blocked for %g s after %d failed AUTHs within %g s",
                            address, self.config.block_seconds, len(window),
                            self.config.failure_window)
                window.clear()

    def record_success(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def _sessions(claims: dict[str, Any]) -> tuple[str, ...] | None:
    value = claims.get("sessions")
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise AuthFailed("claim 'sessions' must be a list of strings")
    return tuple(value)


def _permissions(claims: dict[str, Any]) -> frozenset[str] | None:
    value = claims.get("permissions", claims.get("scope"))
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthFailed("claim 'permissions'/'scope' must be a list or a string")
    return frozenset(value)


def _algorithm_of(private_key: str) -> str:
    """The JWT algorithm for a PEM private key: ES256 for an EC key, else RS256."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"private key is not an unencrypted PEM key: {exc}") from None
    return "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
