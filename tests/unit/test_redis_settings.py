"""Redis connection settings: REDIS_SENTINELS and the TLS variables from the environment, what
redis_conn makes of them for redis-py and for arq, and URLs with their passwords masked."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from orchestrator.config import Settings
from orchestrator.queue import job_deserializer, job_serializer
from orchestrator.redis_conn import JobRedis, redacted_url, redis_client


@pytest.fixture
def ca(tmp_path: Path) -> str:
    path = tmp_path / "ca.crt"
    path.write_text("not parsed before connecting\n")
    return str(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("s1:26379", (("s1", 26379),)),
        (" s1:26379 , 10.0.0.2:26380", (("s1", 26379), ("10.0.0.2", 26380))),
        ("[::1]:26379", (("::1", 26379),)),
    ],
)
def test_sentinels_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, expected: tuple[tuple[str, int], ...]) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", raw)
    assert Settings.from_env().redis_sentinels == expected


@pytest.mark.parametrize("raw", ["s1", "s1:", ":26379", "s1:port", "s1:0", "s1:65536", "s1:1,,s2:2", "s1:-5", "s1:1,"])
def test_bad_sentinels_are_refused_with_the_culprit(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", raw)
    with pytest.raises(ValueError, match=r"REDIS_SENTINELS must be host:port\[,host:port\.\.\.\] with ports 1-65535"):
        Settings.from_env()


def test_redis_variables_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "orch")
    monkeypatch.setenv("ORCH_REDIS_SENTINEL_PASSWORD", "s3cret-sentinel")
    monkeypatch.setenv("REDIS_TLS_CA_FILE", "/etc/redis/ca.crt")
    monkeypatch.setenv("REDIS_TLS_CERT_FILE", "/etc/redis/client.crt")
    monkeypatch.setenv("REDIS_TLS_KEY_FILE", "/etc/redis/client.key")
    settings = Settings.from_env()
    assert settings.redis_sentinel_master == "orch"
    assert settings.redis_sentinel_password == "s3cret-sentinel"
    assert (settings.redis_tls_ca, settings.redis_tls_cert, settings.redis_tls_key) == (
        "/etc/redis/ca.crt",
        "/etc/redis/client.crt",
        "/etc/redis/client.key",
    )
    assert "s3cret-sentinel" not in repr(settings)
    for name in ("REDIS_SENTINEL_MASTER", "ORCH_REDIS_SENTINEL_PASSWORD", "REDIS_TLS_CA_FILE"):
        monkeypatch.delenv(name)
    defaults = Settings.from_env()
    assert (defaults.redis_sentinel_master, defaults.redis_sentinel_password, defaults.redis_tls_ca) == (
        "mymaster",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://worker:p%40ss@redis:6379/0", "redis://worker:***@redis:6379/0"),
        ("rediss://:only-a-password@redis/1", "rediss://:***@redis/1"),
        ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2&password=***"),
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_one_client_for_keys_and_jobs_takes_the_url() -> None:
    plain = redis_client(Settings(redis_url="redis://orchestrator-worker:p%40ss%3Aw@redis:6380/2"))
    kwargs = plain.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis", 6380, 2)
    # Percent-decoded (arq's own from_dsn would not decode).
    assert (kwargs["username"], kwargs["password"]) == ("orchestrator-worker", "p@ss:w")
    # The same client enqueues and consumes jobs, in our JSON format (no pickle).
    assert isinstance(plain, JobRedis)
    assert plain.job_serializer is job_serializer and plain.job_deserializer is job_deserializer
    unix = redis_client(Settings(redis_url="unix:///run/redis.sock?db=3"))
    kwargs = unix.connection_pool.connection_kwargs
    assert (kwargs["path"], kwargs["db"]) == ("/run/redis.sock", 3)


def test_tls_settings(ca: str) -> None:
    settings = Settings(redis_url="rediss://redis:6379/0", redis_tls_ca=ca)
    client = redis_client(settings)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is SSLConnection
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_check_hostname"]) == (ca, True)


def test_tls_misconfiguration_is_refused(ca: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"REDIS_TLS_CA_FILE set, but REDIS_URL \(redis://u:\*\*\*@redis/0\)"):
        redis_client(Settings(redis_url="redis://u:secret@redis/0", redis_tls_ca=ca))
    with pytest.raises(ValueError, match=r"REDIS_TLS_CA_FILE='/nonexistent/ca\.crt' is not a file"):
        redis_client(Settings(redis_url="rediss://redis/0", redis_tls_ca="/nonexistent/ca.crt"))
    key = tmp_path / "client.key"
    key.write_text("")
    with pytest.raises(ValueError, match="REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE"):
        redis_client(Settings(redis_url="rediss://redis/0", redis_tls_key=str(key)))


async def test_sentinel_settings() -> None:
    settings = Settings(
        redis_url="redis://worker:p%40ss@ignored:1/4",
        redis_sentinels=(("s1", 26379), ("s2", 26380)),
        redis_sentinel_master="orch",
        redis_sentinel_password="sentinel-pass",
    )
    client = redis_client(settings)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "orch"
        assert {k: pool.connection_kwargs[k] for k in ("username", "password", "db")} == {
            "username": "worker",
            "password": "p@ss",
            "db": 4,
        }
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"], s["password"]) for s in sentinels] == [
            ("s1", 26379, "sentinel-pass"),
            ("s2", 26380, "sentinel-pass"),
        ]
    finally:
        await client.aclose()
    # Jobs use this client too, so arq gets the sentinels' password (it could not pass one itself).
    assert isinstance(client, JobRedis)


def test_every_client_times_out_and_probes_a_silent_connection() -> None:
    settings = Settings(redis_url="redis://redis:6379/0", redis_socket_timeout_s=20.0, redis_health_check_s=7)
    kwargs = redis_client(settings).connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (20.0, 5.0)
    assert kwargs["socket_keepalive"] is True and kwargs["socket_keepalive_options"]
    assert kwargs["health_check_interval"] == 7
    # The URL's own options win; a unix socket gets no TCP keep-alive.
    url = redis_client(Settings(redis_url="redis://redis/0?socket_timeout=3")).connection_pool.connection_kwargs
    assert url["socket_timeout"] == 3
    assert (
        "socket_keepalive" not in redis_client(Settings(redis_url="unix:///r.sock")).connection_pool.connection_kwargs
    )


def test_the_api_pool_is_bounded_and_waits_for_a_free_connection() -> None:
    client = redis_client(Settings(), max_connections=9, pool_timeout_s=1.5)
    pool = client.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout) == (9, 1.5)
    assert client.auto_close_connection_pool
