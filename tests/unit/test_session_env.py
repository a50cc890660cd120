"""The session env file: what the worker writes (workers/runtime/session_env.py) read back by
the desktop's own loader (desktop_image/session-env.sh), run here by the machine's dash and
bash. Values with every awkward character must arrive byte for byte and never be evaluated."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from workers.runtime.session_env import SESSION_ENV_PATH, encode_env_file, env_archive

LOADER = Path(__file__).resolve().parents[2] / "desktop_image" / "session-env.sh"
# The desktop's /bin/sh (dash) runs desktop-init; bash may source the login-shell hook.
SHELLS = ("dash", "bash")


def awkward(canary: Path) -> dict[str, str]:
    return {
        "A_SUBST": f"$(touch {canary})",
        "B_BACKTICKS": f"`touch {canary}`; touch {canary}",
        "C_QUOTES": 'it\'s "quoted" \\ and \\n not a newline',
        "D_NEWLINES": "line one\nline two\n\n",  # trailing newlines survive
        "E_EQUALS": "=a=b==",
        "F_DASH": "-n -e",
        "G_EMPTY": "",
        "H_UNICODE": "é ✓ 漢字 \U0001f600",
        "I_CONTROL": "tab\there\rcr \x01\x1b[31m",
        "J_LONG": "x" * 8192,
        "PATH": "/nonexistent",  # a session's PATH, set before the variables after it
        "Z_AFTER_PATH": "still decoded",
        "_under": "spaces  and\ttabs ",
    }


def load(shell: str, file: Path, *, pre: str = "") -> tuple[dict[str, str], str]:
    """The environment a command started after ``load_session_env`` sees, and the warnings."""
    script = f'{pre}. "{LOADER}"; load_session_env "$1"; exec /usr/bin/env -0'
    done = subprocess.run(
        [shutil.which(shell) or pytest.fail(f"{shell} is not installed"), "-c", script, "loader", str(file)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
        check=True,
    )
    pairs = (entry.split(b"=", 1) for entry in done.stdout.split(b"\0") if entry)
    return {k.decode(): v.decode() for k, v in pairs}, done.stderr.decode()


@pytest.mark.parametrize("shell", SHELLS)
def test_every_value_arrives_byte_for_byte_and_is_never_evaluated(shell: str, tmp_path: Path) -> None:
    canary = tmp_path / "evaluated"
    env = awkward(canary)
    file = tmp_path / "session.env"
    file.write_bytes(encode_env_file(env))
    seen, warnings = load(shell, file)
    assert {k: seen.get(k) for k in env} == env
    assert warnings == ""
    assert not canary.exists(), "a value was evaluated by the shell"
    # The loader leaves nothing of its own behind.
    assert not [k for k in seen if k.startswith("_senv_")]


@pytest.mark.parametrize("shell", SHELLS)
def test_malformed_lines_are_skipped_without_their_content(shell: str, tmp_path: Path) -> None:
    file = tmp_path / "session.env"
    good = encode_env_file({"GOOD": "yes", "LAST": "no newline"}).rstrip(b"\n")
    secret = "SECRET-VALUE-9f2"
    lines = [
        b"1BAD=" + encode_env_file({"X": secret})[2:].rstrip(),  # a name may not start with a digit
        b"bad-name=c2VjcmV0",
        b"NO_EQUALS_" + secret.encode(),
        b"NOT_BASE64=" + secret.encode() + b"!!",
        b"",
        good,
    ]
    file.write_bytes(b"\n".join(lines))
    seen, warnings = load(shell, file)
    assert (seen.get("GOOD"), seen.get("LAST")) == ("yes", "no newline")
    assert not {"1BAD", "bad-name", "NOT_BASE64"} & set(seen)
    assert secret not in warnings
    for n in (1, 2, 3, 4, 5):
        assert f"line {n} of {file}" in warnings, warnings


def test_a_readonly_variable_is_skipped_and_the_rest_still_load(tmp_path: Path) -> None:
    file = tmp_path / "session.env"
    file.write_bytes(encode_env_file({"AFTER": "loaded", "FIXED": "new"}))
    for shell in SHELLS:  # dash and bash: a refused export must not end a POSIX shell
        seen, warnings = load(shell, file, pre="FIXED=old; readonly FIXED; ")
        assert seen.get("AFTER") == "loaded" and seen.get("FIXED") != "new"
        assert "the shell refused FIXED" in warnings


def test_a_missing_or_unreadable_file_exports_nothing(tmp_path: Path) -> None:
    seen, warnings = load(SHELLS[0], tmp_path / "absent")
    assert (set(seen) - {"PATH", "PWD", "OLDPWD", "SHLVL", "_"}, warnings) == (set(), "")


def test_the_archive_is_root_only() -> None:
    with tarfile.open(fileobj=io.BytesIO(env_archive({"K": "v"}))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        directory, file = members["orchestrator"], members["orchestrator/session.env"]
        assert directory.isdir() and directory.mode == 0o700
        assert file.isfile() and file.mode == 0o600
        assert {directory.uid, directory.gid, file.uid, file.gid} == {0}
        extracted = tar.extractfile(file)
        assert extracted is not None and extracted.read() == b"K=dg==\n"
    assert SESSION_ENV_PATH == "/etc/orchestrator/session.env"  # what the desktop image reads
    assert SESSION_ENV_PATH in LOADER.read_text()
