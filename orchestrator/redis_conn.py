"""Redis connections of every component, from RedisSettings: ``redis://`` or ``rediss://`` (TLS,
verified against REDIS_TLS_CA_FILE or the system CAs, hostname included), an ACL user and
password in the URL, or the master of a Redis Sentinel set (REDIS_SENTINELS). docs/redis.md
has the ACLs to give the API and the workers."""

from __future__ import annotations

import os
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel

from .config import RedisSettings
from .queue import job_deserializer, job_serializer


class JobRedis(ArqRedis):
    """The one Redis client of a process: app keys, scripts and streams (it is a
    ``redis.asyncio.Redis``) and arq's jobs, with our JSON job format (no pickle: producers
    in any language read and write jobs). The worker hands it to arq (``Worker(redis_pool=)``),
    so jobs travel on the same connections, TLS and Sentinel set-up as everything else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("job_serializer", job_serializer)
        kwargs.setdefault("job_deserializer", job_deserializer)
        super().__init__(*args, **kwargs)


def redacted_url(url: str) -> str:
    """``url`` fit for a log: its password (in the userinfo or a ``password=`` query) is ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        url = url.replace(f"//{userinfo}@", f"//{userinfo.partition(':')[0]}:***@", 1)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def _url_options(settings: RedisSettings) -> dict[str, Any]:
    return dict(parse_url(settings.redis_url))


def _tls(settings: RedisSettings, options: dict[str, Any]) -> dict[str, Any]:
    """redis-py's TLS options: {} for redis:// (an error if TLS files are configured)."""
    files = {
        "REDIS_TLS_CA_FILE": settings.redis_tls_ca,
        "REDIS_TLS_CERT_FILE": settings.redis_tls_cert,
        "REDIS_TLS_KEY_FILE": settings.redis_tls_key,
    }
    for name, path in files.items():
        if path and not os.path.isfile(path):
            raise ValueError(f"{name}={path!r} is not a file")
    if settings.redis_tls_key and not settings.redis_tls_cert:
        raise ValueError("REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE")
    if urlsplit(settings.redis_url).scheme != "rediss":
        configured = [name for name, path in files.items() if path]
        if configured:
            raise ValueError(
                f"{', '.join(configured)} set, but REDIS_URL ({redacted_url(settings.redis_url)}) is not rediss://"
            )
        return {}
    return {
        "ssl_ca_certs": settings.redis_tls_ca,
        "ssl_certfile": settings.redis_tls_cert,
        "ssl_keyfile": settings.redis_tls_key,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": options.get("ssl_check_hostname", True),
    }


class _SentinelMaster(JobRedis):
    """The master's client, which also closes its connections to the sentinels."""

    _sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()


# Keep-alive probes on an idle connection: a peer gone without a FIN is found in ~25 s, not
# the kernel's default two hours.
_KEEPALIVE = {
    name: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


def _timeouts(settings: RedisSettings, options: dict[str, Any]) -> dict[str, Any]:
    """Socket timeouts, keep-alive and health checks for every connection (the URL's own
    ``socket_timeout=`` and the like still win)."""
    out: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": settings.redis_health_check_s,
    }
    if "path" not in options:  # TCP only: a unix socket has no keep-alive
        out["socket_keepalive"] = True
        out["socket_keepalive_options"] = {getattr(socket, name): value for name, value in _KEEPALIVE.items()}
    return {key: value for key, value in out.items() if key not in options}


def redis_client(
    settings: RedisSettings, *, max_connections: int | None = None, pool_timeout_s: float = 5.0, **kwargs: Any
) -> JobRedis:
    """A client of the Redis master; ``kwargs`` go to ``redis.asyncio.Redis``. With
    ``max_connections``, at most that many connections: a command waits up to ``pool_timeout_s``
    for a free one, then fails (Sentinel: it fails at once, redis-py's sentinel pool cannot wait)."""
    options = _url_options(settings)
    tls = _tls(settings, options)
    kwargs = {**_timeouts(settings, options), **kwargs}
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if not settings.redis_sentinels:
        if max_connections is None:
            client: JobRedis = JobRedis.from_url(settings.redis_url, **tls, **kwargs)
            return client
        pool = BlockingConnectionPool.from_url(settings.redis_url, timeout=pool_timeout_s, **tls, **kwargs)
        pooled = JobRedis(connection_pool=pool)
        pooled.auto_close_connection_pool = True  # aclose() closes the pool too (as from_url's)
        return pooled
    if "path" in options:
        raise ValueError("REDIS_SENTINELS needs a redis:// or rediss:// REDIS_URL, not unix://")
    master = {k: v for k, v in options.items() if k not in ("host", "port", "path", "connection_class")}
    to_sentinels: dict[str, Any] = {k: v for k, v in {**master, **kwargs}.items() if k.startswith("socket_")}
    if settings.redis_sentinel_password:
        to_sentinels["password"] = settings.redis_sentinel_password
    if tls:
        master.update(ssl=True, **tls)
        to_sentinels.update(ssl=True, **tls)
    sentinel = Sentinel(settings.redis_sentinels, sentinel_kwargs=to_sentinels, **master)  # type: ignore[no-untyped-call]
    master_client: _SentinelMaster = sentinel.master_for(
        settings.redis_sentinel_master, redis_class=_SentinelMaster, **kwargs
    )
    master_client._sentinel = sentinel
    return master_client
