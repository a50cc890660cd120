"""scripts/fetch-web-assets.sh, offline: a tarball that is not the pinned one is refused before
anything is unpacked, and vendored files that match their pins are kept without a download."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "orchestrator" / "static" / "vendor"


def _checkout(tmp: Path) -> Path:
    """The script alone in a scratch tree: it works relative to its own directory."""
    (tmp / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "fetch-web-assets.sh", tmp / "scripts")
    return tmp


def _run(tree: Path, registry: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(tree / "scripts" / "fetch-web-assets.sh"), *args],
        env={"PATH": "/usr/bin:/bin", "ORCH_NPM_REGISTRY": registry},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_tarball_other_than_the_pinned_one_is_refused_and_nothing_is_unpacked(tmp_path: Path) -> None:
    tree = _checkout(tmp_path / "tree")
    registry = tmp_path / "registry"
    (registry / "@xterm" / "xterm" / "-").mkdir(parents=True)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        for member in ("package/lib/xterm.js", "package/css/xterm.css", "package/LICENSE"):
            data = b"alert('not xterm')"
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (registry / "@xterm" / "xterm" / "-" / "xterm-6.0.0.tgz").write_bytes(evil.getvalue())

    result = _run(tree, registry.as_uri())
    assert result.returncode != 0
    assert "@xterm/xterm@6.0.0: integrity sha512-" in result.stderr
    assert not (tree / "orchestrator").exists()


def test_vendored_files_matching_their_pins_are_kept_without_a_download(tmp_path: Path) -> None:
    if not (VENDOR / "SHA256SUMS").exists():
        pytest.fail(f"{VENDOR} is missing: run scripts/fetch-web-assets.sh (make venv does)")
    tree = _checkout(tmp_path / "tree")
    vendor = tree / "orchestrator" / "static" / "vendor"
    shutil.copytree(VENDOR, vendor)
    nowhere = (tmp_path / "no-registry").as_uri()

    assert _run(tree, nowhere).returncode == 0  # current: no download (the registry does not exist)
    assert _run(tree, nowhere, "--check").returncode == 0
    # A changed file is stale: --check says so, and a run fetches anew (here: fails to).
    (vendor / "xterm.js").write_bytes(b"changed")
    check = _run(tree, nowhere, "--check")
    assert check.returncode == 1 and "missing or stale" in check.stderr
    fetch = _run(tree, nowhere)
    assert fetch.returncode != 0 and "downloading" in fetch.stderr
