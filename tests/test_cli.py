"""The ``pluginlab`` command (``demo``, ``plugins``, ``token``), run as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import numpy as np
import pytest
import soundfile as sf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pluginlab import builtin_names
from pluginlab.effects import library

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "pluginlab"



def _command() -> list[str]:
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pluginlab.cli"]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*_command(), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=180, check=False)


def test_no_command_prints_help(tmp_path: Path):
    done = run_cli(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "plugins" in done.stdout


def test_demo_writes_the_processed_loop(tmp_path: Path):
    out = tmp_path / "out" / "demo.wav"
    done = run_cli("demo", "--out", str(out), "--seconds", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    audio, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 44100 and audio.shape == (2 * 44100, 2)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0.01
    assert "Filter -> Compressor -> Reverb" in done.stdout
    assert "wet_dry=0.35" in done.stdout and "cutoff=2500 Hz" in done.stdout
    assert f"wrote {out}" in done.stdout
    dry = sf.read(str(ROOT / "data" / "drum_loop.wav"), dtype="float32", always_2d=True)[0]
    assert not np.allclose(audio, dry[: 2 * 44100], atol=1e-3)  # really processed


def test_demo_at_another_rate(tmp_path: Path):
    out = tmp_path / "demo48.wav"
    done = run_cli("demo", "--out", str(out), "--seconds", "1", "--sample-rate", "48000",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    audio, rate = sf.read(str(out), dtype="float32", always_2d=True)
    assert rate == 48000 and audio.shape == (48000, 2)


def test_demo_missing_input_fails(tmp_path: Path):
    done = run_cli("demo", "--input", "missing.wav", "--out", str(tmp_path / "x.wav"),
                   cwd=tmp_path)
    assert done.returncode != 0
    assert "missing.wav" in done.stderr
    assert not (tmp_path / "x.wav").exists()


def test_plugins_lists_builtins_and_binaries(tmp_path: Path):
    (tmp_path / "Fake-vst.so").write_bytes(b"not really")
    (tmp_path / "Other.vst3").mkdir()
    done = run_cli("plugins", "--dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in builtin_names():
        spec = library()[name.lower()]
        line = next(x for x in lines if x.split() and x.split()[0] == name)
        assert ("source" if spec.is_source else "effect") in line
        assert ", ".join(p.id for p in spec.parameters) in line
    assert "binaries (2):" in done.stdout
    assert any("Fake" in x and "vst2" in x for x in lines)
    assert any("Other" in x and "vst3" in x for x in lines)


def test_plugins_finds_installed_vsts(tmp_path: Path, vst_path: str):
    done = run_cli("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert os.path.realpath(vst_path) in done.stdout
    assert "binaries (0)" not in done.stdout


def test_token_carries_the_requested_claims(tmp_path: Path):
    secret = "cli-test-secret-" + "0123456789abcdef" * 3
    done = run_cli("token", "alice", "--jwt-secret", secret, "--session", "jam", "--session",
                   "band", "--permission", "plugin:read", "--lifetime", "60", "--json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)["token"]
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["sessions"] == ["jam", "band"]
    assert claims["permissions"] == ["plugin:read"] and claims["exp"] - claims["iat"] == 60


def test_token_refuses_an_unknown_permission_without_a_traceback(tmp_path: Path):
    done = run_cli("token", "alice", "--jwt-secret", "x" * 40, "--permission", "plugin:nonsense",
                   cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown permission(s) plugin:nonsense" in done.stderr
    assert "Traceback" not in done.stderr


def test_token_signed_with_an_ec_key_needs_no_algorithm_flag(tmp_path: Path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(public)
    done = run_cli("token", "alice", "--jwt-public-key", str(tmp_path / "ec.pub"),
                   "--private-key", str(tmp_path / "ec.pem"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), public, algorithms=["ES256"])["sub"] == "alice"


# -- serve: settings that cannot work --------------------------------------------------------

def _public_key(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pub"
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize(("args", "env", "said"), [
    (["--messages-per-second", "-1"], {}, "messages_per_second must be a whole number >= 0"),
    (["--debounce-window", "nan"], {}, "debounce_window must be a finite number"),
    (["--max-frame", "0"], {}, "max_frame must be a number of bytes >= 1"),
    (["--path", "ws"], {}, "path must start with '/'"),
    (["--port", "70000"], {}, "port must be 0..65535"),
    (["--jwt-algorithm", "HS999"], {}, "jwt_algorithm must be one of"),
    (["--jwt-public-key", "missing.pub"], {}, "jwt_public_key: 'missing.pub' no such file"),
    (["--jwt-public-key", "."], {}, "jwt_public_key: '.' is a folder"),
    (["--jwt-public-key", "ec.pub", "--jwt-secret", "s" * 32], {}, "not both"),
    (["--jwt-public-key", "ec.pub", "--jwt-algorithm", "RS256"], {}, "an EC key"),
    ([], {"PLUGINLAB_MESSAGES_PER_SECOND": "abc"}, "messages_per_second: expected a number"),
    ([], {"ENABLE_DAID_TRACKING": "maybe"}, "enable_daid_tracking: expected true/false"),
    (["--jwt-secret-file", "nope.txt"], {}, "jwt_secret_file: no such file 'nope.txt'"),
    (["--jwt-secret-file", "ec.pub", "--jwt-secret", "s" * 32], {}, "not both"),
    (["--jwt-secret-file", "empty.txt"], {}, "jwt_secret_file 'empty.txt' is empty"),
    (["--token-user", "u" * 129], {}, "token user must be 1 to 128 characters"),
])
def test_serve_refuses_settings_that_cannot_work(tmp_path: Path, args: list[str],
                                                 env: dict[str, str], said: str) -> None:
    """One ``error:`` line and exit 2, before anything is opened or bound: a typo must not
    start a server that behaves differently (or refuses every token) while looking fine."""
    _public_key(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    done = run_cli("serve", "--port", "0", "--db", str(tmp_path / "x.sqlite"), *args,
                   cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert said in done.stderr and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr and "serving" not in done.stdout
    assert not (tmp_path / "x.sqlite").exists()


def test_serve_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", str(port), "--jwt-secret", "s" * 32,
                       "--db", str(tmp_path / "x.sqlite"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@contextlib.contextmanager
def serve_lines(tmp_path: Path, *args: str, env: dict[str, str] | None = None
                ) -> Iterator[list[str]]:
    """``pluginlab serve --port 0 --db '' ARGS`` as a real process: yields its first three
    output lines, then stops it with Ctrl-C (SIGINT), which must end it cleanly."""
    process = subprocess.Popen(
        [*_command(), "serve", "--port", "0", "--db", "", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        assert process.stdout is not None
        yield [process.stdout.readline() for _ in range(3)]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_serve_with_a_public_key_says_how_to_get_a_token(tmp_path: Path) -> None:
    key = _public_key(tmp_path)
    with serve_lines(tmp_path, "--jwt-public-key", str(key)) as lines:
        assert lines[0].startswith("pluginlab serving on ws://127.0.0.1:")
        assert f"pluginlab token USER --jwt-public-key {key} --private-key" in lines[1]


def test_serve_takes_the_ready_token_user_from_the_environment(tmp_path: Path) -> None:
    secret = "s" * 32
    with serve_lines(tmp_path, "--jwt-secret", secret,
                     env={"PLUGINLAB_TOKEN_USER": "bob"}) as lines:
        assert "token for 'bob'" in "".join(lines), lines
        token = next(line.split()[-1] for line in lines if line.count(".") == 2
                     and line.split()[-1].startswith("ey"))
        assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "bob"


def test_the_secret_can_live_in_a_file(tmp_path: Path) -> None:
    """--jwt-secret-file: the secret stays out of ``ps`` and the environment; tokens issued
    with the same file verify with its first line."""
    secret = "file-secret-" + "x" * 32
    (tmp_path / "secret.txt").write_text(secret + "\n# comment lines after it are ignored\n")
    done = run_cli("token", "alice", "--jwt-secret-file", "secret.txt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "alice"
    from pluginlab.config import ServerConfig
    from pluginlab.server import build_authenticator

    auth, generated = build_authenticator(
        ServerConfig(jwt_secret_file=str(tmp_path / "secret.txt")))
    assert not generated and auth.verify(done.stdout.strip()).user_id == "alice"


def test_token_refuses_a_private_key_that_does_not_match_the_public_one(tmp_path: Path):
    """A token from a mismatched pair would only be refused later, by the server."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "other.pub").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    done = run_cli("token", "alice", "--jwt-public-key", "other.pub", "--private-key",
                   "ec.pem", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert "does not belong to --jwt-public-key" in done.stderr
