"""Authenticator unit tests: JWT verification, claims, algorithm pinning and failure blocking.

No server here: tokens are made with PyJWT (or by hand, for the forged ones) and checked
with :class:`pluginlab.auth.Authenticator`; the blocking logic runs on a fake clock.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from server_helpers import forge_hs256, rsa_key_pair

from pluginlab.auth import AuthConfig, Authenticator, Identity, generate_secret
from pluginlab.errors import AuthFailed, ErrorCode

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hs(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, **extra}


def reason(auth: Authenticator, token: Any, claimed: Any = None) -> str:
    with pytest.raises(AuthFailed) as info:
        auth.verify(token, claimed)
    assert info.value.code is ErrorCode.AUTH_FAILED
    return str(info.value.details["reason"])


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    return rsa_key_pair()


@pytest.fixture()
def auth() -> Authenticator:
    return Authenticator(AuthConfig(secret=SECRET))


# -- HS256 ---------------------------------------------------------------------------------

def test_issue_and_verify_roundtrip(auth: Authenticator) -> None:
    identity = auth.verify(auth.issue("alice"))
    assert identity == Identity("alice")
    assert identity.sessions is None and identity.permissions is None
    assert identity.allows("plugin:write") and identity.may_join("anything")
    assert identity.claims["sub"] == "alice" and "exp" in identity.claims


def test_issue_with_sessions_and_permissions(auth: Authenticator) -> None:
    identity = auth.verify(auth.issue("bob", sessions=["a", "b"], permissions=["plugin:read"]))
    assert identity.sessions == ("a", "b")
    assert identity.may_join("a") and not identity.may_join("c")
    assert identity.allows("plugin:read") and not identity.allows("plugin:write")


def test_scope_claim_as_space_separated_string(auth: Authenticator) -> None:
    identity = auth.verify(hs(claims(scope="plugin:read plugin:add")))
    assert identity.permissions == frozenset({"plugin:read", "plugin:add"})
    assert auth.verify(hs(claims(sessions="solo"))).sessions == ("solo",)


@pytest.mark.parametrize("user_claim", ["user_id", "userId"])
def test_user_id_claims_are_accepted_without_sub(auth: Authenticator, user_claim: str) -> None:
    body = claims(**{user_claim: "carol"})
    del body["sub"]
    assert auth.verify(hs(body)).user_id == "carol"


def test_claimed_user_id_must_match_the_subject(auth: Authenticator) -> None:
    token = auth.issue("alice")
    assert auth.verify(token, "alice").user_id == "alice"
    assert auth.verify(token, "").user_id == "alice"
    assert auth.verify(token, None).user_id == "alice"
    assert reason(auth, token, "mallory") == "user_id does not match token subject"


@pytest.mark.parametrize("token", [None, "", 123, ["x"], {"token": "x"}])
def test_missing_token(auth: Authenticator, token: Any) -> None:
    assert reason(auth, token) == "missing token"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "a.b", "\u00e9.\u00e9.\u00e9"])
def test_malformed_tokens(auth: Authenticator, token: str) -> None:
    assert reason(auth, token).startswith("invalid token")


def test_expired_token_and_leeway() -> None:
    now = int(time.time())
    lenient = Authenticator(AuthConfig(secret=SECRET))  # default leeway 30 s
    strict = Authenticator(AuthConfig(secret=SECRET, leeway=0))
    recently = hs({"sub": "alice", "exp": now - 10})
    assert lenient.verify(recently).user_id == "alice"
    assert reason(strict, recently) == "token expired"
    assert reason(lenient, hs({"sub": "alice", "exp": now - 3600})) == "token expired"
    assert reason(lenient, lenient.issue("alice", lifetime=-120)) == "token expired"


def test_exp_is_required(auth: Authenticator) -> None:
    assert reason(auth, hs({"sub": "alice"})) == "token lacks claim 'exp'"


def test_token_without_subject(auth: Authenticator) -> None:
    assert reason(auth, hs({"exp": int(time.time()) + 60})) == "token has no subject"
    assert reason(auth, hs(claims(sub=""))) == "token has no subject"


def test_a_subject_longer_than_an_id_is_refused(auth: Authenticator) -> None:
    """The user id is copied into every message and event: the 128-character id limit holds
    for it too, whoever signed the token."""
    assert auth.verify(hs(claims(sub="u" * 128))).user_id == "u" * 128
    assert reason(auth, hs(claims(sub="u" * 129))) == "token subject longer than 128 characters"
    with pytest.raises(ValueError, match="1 to 128 characters"):
        auth.issue("u" * 129)


def test_wrong_key(auth: Authenticator) -> None:
    assert reason(auth, hs(claims(), key="another-secret-another-secret-another")) == \
        "bad signature"


def test_alg_none_is_refused(auth: Authenticator) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert reason(auth, unsigned) == "token algorithm not allowed"
    assert reason(auth, unsigned.rstrip(".") + ".AAAA") == "token algorithm not allowed"


def test_other_hmac_algorithms_are_refused(auth: Authenticator) -> None:
    assert reason(auth, hs(claims(), algorithm="HS512")) == "token algorithm not allowed"


def test_ill_typed_claims(auth: Authenticator) -> None:
    assert "sessions" in reason(auth, hs(claims(sessions=[1, 2])))
    assert "sessions" in reason(auth, hs(claims(sessions={"a": 1})))
    assert "permissions" in reason(auth, hs(claims(permissions=5)))
    assert "permissions" in reason(auth, hs(claims(scope=[None])))


def test_config_needs_a_key() -> None:
    with pytest.raises(ValueError):
        Authenticator(AuthConfig())
    assert AuthConfig(secret="x").algorithms() == ["HS256"]
    assert AuthConfig(public_key="pem").algorithms() == ["RS256", "ES256"]
    assert AuthConfig(public_key="pem", algorithm="ES256").algorithms() == ["ES256"]
    assert len(generate_secret()) >= 32 and generate_secret() != generate_secret()


# -- asymmetric ----------------------------------------------------------------------------

def test_rs256_with_a_public_key(rsa_keys: tuple[str, str]) -> None:
    private, public = rsa_keys
    auth = Authenticator(AuthConfig(public_key=public, private_key=private))
    assert auth.verify(auth.issue("alice")).user_id == "alice"
    assert auth.verify(jwt.encode(claims(), private, algorithm="RS256")).user_id == "alice"


def test_hs256_signed_with_the_public_key_is_refused(rsa_keys: tuple[str, str]) -> None:
    """The classic HS/RS confusion: the attacker knows the public PEM and uses it as secret."""
    _, public = rsa_keys
    auth = Authenticator(AuthConfig(public_key=public))
    forged = forge_hs256(claims(), public.encode())
    assert reason(auth, forged) == "token algorithm not allowed"
    # and an HS256 token with the server's HMAC secret is no good either
    assert reason(auth, hs(claims())) == "token algorithm not allowed"


def test_rs256_signed_by_another_key_is_refused(rsa_keys: tuple[str, str]) -> None:
    _, public = rsa_keys
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert reason(Authenticator(AuthConfig(public_key=public)), token) == "bad signature"


def test_a_token_for_another_kind_of_key_is_refused_in_plain_words(
        rsa_keys: tuple[str, str]) -> None:
    _, public = rsa_keys  # an RSA server key; an EC-signed token
    token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    said = reason(Authenticator(AuthConfig(public_key=public)), token)
    assert said == "token signed for another kind of key"  # not PyJWT's generator repr


def test_es256_with_a_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    auth = Authenticator(AuthConfig(public_key=public, algorithm="ES256"))
    assert auth.verify(jwt.encode(claims(), key, algorithm="ES256")).user_id == "alice"
    with pytest.raises(ValueError):
        Authenticator(AuthConfig(public_key=public)).issue("alice")  # no private key


def test_issue_picks_the_algorithm_of_the_private_key() -> None:
    """An EC key signs ES256 without naming the algorithm (the server accepts RS256 and
    ES256 by default); the token verifies."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    auth = Authenticator(AuthConfig(public_key=public, private_key=private))
    token = auth.issue("alice")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert auth.verify(token).user_id == "alice"


def test_issue_refuses_unknown_permissions(auth: Authenticator) -> None:
    with pytest.raises(ValueError, match="plugin:nonsense"):
        auth.issue("alice", permissions=["plugin:read", "plugin:nonsense"])


def test_hs_token_is_refused_by_an_asymmetric_config_even_with_a_shared_secret_set(
        rsa_keys: tuple[str, str]) -> None:
    _, public = rsa_keys
    auth = Authenticator(AuthConfig(secret=SECRET, public_key=public))
    assert reason(auth, hs(claims())) == "token algorithm not allowed"


# -- failure blocking ----------------------------------------------------------------------

def blocked_retry_after(auth: Authenticator, address: str) -> float:
    with pytest.raises(AuthFailed) as info:
        auth.check_blocked(address)
    assert info.value.details["reason"] == "blocked"
    return float(info.value.details["retry_after"])


def test_blocking_is_logged_and_zero_failures_means_never_block(
        caplog: pytest.LogCaptureFixture) -> None:
    auth = Authenticator(AuthConfig(secret=SECRET, max_failures=2, block_seconds=300))
    with caplog.at_level("WARNING", logger="pluginlab.auth"):
        auth.record_failure("10.0.0.9")
        assert caplog.records == []
        auth.record_failure("10.0.0.9")
    assert "address 10.0.0.9 blocked for 300 s after 2 failed AUTHs" in caplog.text
    never = Authenticator(AuthConfig(secret=SECRET, max_failures=0))
    for _ in range(50):
        never.record_failure("10.0.0.9")
    never.check_blocked("10.0.0.9")  # 0 = no limit, like the other limits


def test_repeated_failures_block_the_address_for_a_while() -> None:
    clock = FakeClock()
    auth = Authenticator(AuthConfig(secret=SECRET, max_failures=3, failure_window=60,
                                    block_seconds=300), clock=clock)
    for _ in range(2):
        auth.record_failure("10.0.0.1")
        auth.check_blocked("10.0.0.1")  # not yet
    auth.record_failure("10.0.0.1")
    assert blocked_retry_after(auth, "10.0.0.1") == 300
    auth.check_blocked("10.0.0.2")  # other addresses are not affected
    clock.now += 120
    assert blocked_retry_after(auth, "10.0.0.1") == 180
    clock.now += 180
    auth.check_blocked("10.0.0.1")  # the block has expired
    auth.record_failure("10.0.0.1")
    auth.check_blocked("10.0.0.1")  # and the count started over


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = FakeClock()
    auth = Authenticator(AuthConfig(secret=SECRET, max_failures=3, failure_window=10),
                         clock=clock)
    for _ in range(10):
        auth.record_failure("a")
        clock.now += 6  # at most two failures inside any 10 s
        assert auth.check_blocked("a") is None  # not blocked (it raises when blocked)


def test_a_success_resets_the_count() -> None:
    clock = FakeClock()
    auth = Authenticator(AuthConfig(secret=SECRET, max_failures=3), clock=clock)
    auth.record_failure("a")
    auth.record_failure("a")
    auth.record_success("a")
    auth.record_failure("a")
    auth.record_failure("a")
    assert auth.check_blocked("a") is None  # two since the success: not blocked yet
    auth.record_failure("a")
    assert blocked_retry_after(auth, "a") > 0
