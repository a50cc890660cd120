"""The edge check of a path into a desktop: what it accepts (normalised) and what it refuses,
each refusal 400 ``invalid_path`` naming the field and saying why."""

from __future__ import annotations

import pytest

from orchestrator.desktop_paths import PATH_MAX, check_desktop_path
from orchestrator.errors import ServiceError


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("/", "/"),
        ("//", "/"),
        ("/tmp", "/tmp"),
        ("/tmp/", "/tmp"),
        ("//tmp//a///b/", "/tmp/a/b"),
        ("/tmp/./a/.", "/tmp/a"),
        ("/tmp/..a/b..", "/tmp/..a/b.."),  # names that start or end with dots are names
        ("/procfs/x", "/procfs/x"),  # not /proc
        ("/devices", "/devices"),
        ("/home/u/Résumé.pdf", "/home/u/Résumé.pdf"),
        ("/a b/\n", "/a b/\n"),  # any byte but NUL is a path's
    ],
)
def test_accepted_paths_come_back_normalised(given: str, normal: str) -> None:
    assert check_desktop_path(given) == normal


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "empty"),
        ("tmp/a", "absolute"),
        ("./a", "absolute"),
        ("~/a", "absolute"),
        ("/tmp/\0x", "NUL"),
        ("/tmp/../etc/shadow", "'..'"),
        ("/..", "'..'"),
        ("/tmp/a/..", "'..'"),
        ("/proc", "/proc"),
        ("/proc/self/environ", "/proc"),
        ("//proc/1", "/proc"),
        ("/./sys/kernel", "/sys"),
        ("/dev/zero", "/dev"),
        ("/dev/", "/dev"),
        ("/\udcff", "UTF-8"),
        ("/" + "a" * PATH_MAX, "more than 4096"),
    ],
)
def test_refused_paths_say_why(given: str, why: str) -> None:
    with pytest.raises(ServiceError) as caught:
        check_desktop_path(given, field="dest")
    error = caught.value
    assert (error.status, error.code, error.field) == (400, "invalid_path", "dest")
    assert why in error.message and error.message.startswith("dest "), error.message


def test_the_limit_counts_bytes_not_characters() -> None:
    fits = "/" + "a" * (PATH_MAX - 1)
    assert check_desktop_path(fits) == fits
    with pytest.raises(ServiceError):
        check_desktop_path("/" + "é" * (PATH_MAX // 2))  # 2 bytes each
