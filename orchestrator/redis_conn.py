"""Redis connections of every component, from RedisSettings: ``redis://`` or ``rediss://`` (TLS,
verified against REDIS_TLS_CA_FILE or the system CAs, hostname included), an ACL user and
password in the URL, or the master of a Redis Sentinel set (REDIS_SENTINELS). docs/redis.md
has the ACLs to give the API and the workers."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from arq.connections import RedisSettings as ArqRedisSettings
from redis.asyncio.connection import parse_url
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


def redis_client(settings: RedisSettings, **kwargs: Any) -> JobRedis:
    """A client of the Redis master; ``kwargs`` go to ``redis.asyncio.Redis``."""
    options = _url_options(settings)
    tls = _tls(settings, options)
    if not settings.redis_sentinels:
        client: JobRedis = JobRedis.from_url(settings.redis_url, **tls, **kwargs)
        return client
    if "path" in options:
        raise ValueError("REDIS_SENTINELS needs a redis:// or rediss:// REDIS_URL, not unix://")
    master = {k: v for k, v in options.items() if k not in ("host", "port", "path", "connection_class")}
    to_sentinels: dict[str, Any] = {k: v for k, v in master.items() if k.startswith("socket_")}
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


def arq_redis_settings(settings: RedisSettings) -> ArqRedisSettings:
    """The same connection for arq (``create_pool``, ``Worker``)."""
    options = _url_options(settings)
    tls = _tls(settings, options)
    credentials = {
        "database": options.get("db", 0),
        "username": options.get("username"),
        "password": options.get("password"),
    }
    if settings.redis_sentinels:
        # arq 0.28 hands its Sentinel no sentinel_kwargs and the master only the ssl flag.
        if tls or settings.redis_sentinel_password:
            raise ValueError(
                "arq cannot reach sentinels over TLS (rediss://) or with ORCH_REDIS_SENTINEL_PASSWORD: "
                "with REDIS_SENTINELS, use redis:// and sentinels without a password (see docs/redis.md)"
            )
        return ArqRedisSettings(
            host=list(settings.redis_sentinels),
            sentinel=True,
            sentinel_master=settings.redis_sentinel_master,
            **credentials,
        )
    return ArqRedisSettings(
        host=options.get("host", "localhost"),
        port=options.get("port", 6379),
        unix_socket_path=options.get("path"),
        ssl=bool(tls),
        ssl_ca_certs=tls.get("ssl_ca_certs"),
        ssl_certfile=tls.get("ssl_certfile"),
        ssl_keyfile=tls.get("ssl_keyfile"),
        ssl_check_hostname=tls.get("ssl_check_hostname", False),
        **credentials,
    )
