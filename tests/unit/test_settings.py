"""The settings table (orchestrator/config.py): every field declared once with its variable,
from_env and to_env inverse of each other, bad values refused naming their variable, the
component classes holding only their own fields, and README's table generated from it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config
from orchestrator.config import ApiSettings, RedisSettings, Settings, SharedSettings, WorkerSettings, to_env

# Fields that are no configuration (they never had a variable): the stream lengths both sides
# must agree on, and the machine's name.
NOT_FROM_ENV = {"firehose_maxlen", "session_stream_maxlen", "hostname"}

# A value for every variable, none of them the default: the round trip then covers each field.
EVERYTHING = Settings(
    redis_url="rediss://worker:p%40ss@redis:6380/2",
    redis_sentinels=(("s1", 26379), ("::1", 26380)),
    redis_sentinel_master="orch",
    redis_sentinel_password="sentinel-pass",
    redis_tls_ca="/etc/redis/ca.crt",
    redis_tls_cert="/etc/redis/client.crt",
    redis_tls_key="/etc/redis/client.key",
    redis_socket_timeout_s=12.0,
    redis_connect_timeout_s=2.5,
    redis_health_check_s=7,
    key_prefix="t-1:",
    max_sessions=7,
    max_cpus=1.5,
    max_memory_mb=777,
    max_pids=99,
    default_ttl_s=60,
    default_ttl_action="delete",
    api_host="0.0.0.0",
    api_port=9090,
    max_body_bytes=1024,
    sse_keepalive_s=0.5,
    monitor_interval_s=0.25,
    default_sandbox="sb",
    tokens="a:" + "0" * 64 + ":admin;b:" + "1" * 64 + ":events:read",
    tenant_max_sessions=12,
    exec_keep_s=120,
    exec_max_timeout_s=600.0,
    exec_max_output_bytes=2**20,
    exec_max_stdin_bytes=4096,
    exec_max_per_session=4,
    command_claim_idle_s=5.5,
    command_deadline_s=60.0,
    port_url_ttl_s=60,
    port_url_base="https://ports.example.com",
    port_max_body_bytes=2**20,
    port_timeout_s=5.5,
    port_keepalive_s=4.5,
    port_ws_max_message_bytes=2**16,
    sse_max_streams=300,
    access_route="relay",
    terminal_max_per_session=2,
    files_max_bytes=2**20,
    terminal_idle_s=60.0,
    sse_max_streams_per_token=30,
    max_query_bytes=2048,
    max_header_bytes=8192,
    max_connections=512,
    redis_max_connections=16,
    redis_pool_timeout_s=1.5,
    sandbox_id="sb-2",
    depth=3,
    docker_host="unix:///run/inner.sock",
    desktop_image="example/desktop:1",
    graphical_image="example/desktop-graphical:1",
    registry="registry:5000",
    socket_dir="/tmp/desktops",
    privilege="runtime:sysbox-runc",
    ready_timeout_s=12.5,
    stop_timeout_s=3,
    provision_timeout_s=7.25,
    preload_timeout_s=33.5,
    operation_timeout_s=99.5,
    docker_read_timeout_s=8.5,
    heartbeat_interval_s=1.0,
    lost_after_s=4.0,
    health_interval_s=0.75,
    reconcile_interval_s=0.5,
    orphan_grace_s=30.0,
    reconcile_max_removals=5,
    tombstone_ttl_s=3600,
    lock_lease_s=2.0,
    poll_delay_s=0.125,
    poll_fallback_s=2.5,
    max_jobs=4,
    pool_size=2,
    pool_graphical_size=1,
    exec_max_running=64,
    sandbox_labels={"gpu": "true", "zone": "a"},
    drain_timeout_s=9.0,
    min_free_disk_mb=512,
    firewall=True,
    desktop_deny=("10.96.0.0/12", "fd00::/8"),
    desktop_allow=("10.20.30.0/24",),
    registry_credentials=("puller", "pull-s3cret"),
    worker_metrics_port=9100,
    worker_access_port=9200,
    worker_access_host="10.0.0.5",
    fault_kill_at="after_volume",
)


def env_fields(cls: type[RedisSettings]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if config.spec_of(f).env is not None]


def test_every_field_is_declared_with_a_variable() -> None:
    fields = dataclasses.fields(Settings)
    assert len(fields) == 91
    specs = {f.name: config.spec_of(f) for f in fields}  # raises for a field made without setting()
    assert {name for name, spec in specs.items() if spec.env is None} == NOT_FROM_ENV
    names = [spec.env for spec in specs.values() if spec.env is not None]
    assert len(names) == len(set(names)), "two fields read the same variable"
    assert all(spec.doc and "\n" not in spec.doc for spec in specs.values())


def test_each_component_has_only_its_fields() -> None:
    def names(cls: type[RedisSettings]) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    redis, shared, api, worker = names(RedisSettings), names(SharedSettings), names(ApiSettings), names(WorkerSettings)
    assert {"redis_url", "redis_sentinels", "redis_tls_ca", "key_prefix"} <= redis
    assert redis < shared
    assert {"max_sessions", "max_cpus", "default_ttl_s", "firehose_maxlen"} <= shared - redis
    assert api & worker == shared
    assert {"tokens", "api_port", "sse_keepalive_s", "default_sandbox"} <= api - shared
    assert {"sandbox_id", "docker_host", "lost_after_s", "heartbeat_interval_s", "hostname"} <= worker - shared
    assert names(Settings) == api | worker


def test_the_sample_sets_every_variable() -> None:
    """Otherwise the round trip below would not cover a new field."""
    defaults = Settings()
    same = [f.name for f in env_fields(Settings) if getattr(EVERYTHING, f.name) == getattr(defaults, f.name)]
    assert same == []


@pytest.mark.parametrize("cls", [Settings, ApiSettings, WorkerSettings, SharedSettings, RedisSettings])
def test_from_env_inverts_to_env(cls: type[RedisSettings]) -> None:
    own = {f.name: getattr(EVERYTHING, f.name) for f in dataclasses.fields(cls)}
    settings = cls(**own)
    env = to_env(settings)
    assert set(env) == {config.spec_of(f).env for f in env_fields(cls)}
    assert all(isinstance(value, str) for value in env.values())
    assert cls.from_env(env) == settings
    assert cls.from_env(to_env(cls())) == cls()


def test_to_env_leaves_unset_out() -> None:
    env = to_env(Settings())
    assert "DOCKER_HOST" not in env
    assert "ORCH_DEFAULT_SANDBOX" not in env
    assert env["ORCH_FIREWALL"] == "0"
    assert env["REDIS_SENTINELS"] == ""
    assert to_env(EVERYTHING)["REDIS_SENTINELS"] == "s1:26379,[::1]:26380"


def test_to_env_refuses_what_the_environment_cannot_say() -> None:
    # An empty variable is read as unset: an empty key prefix would come back as the default.
    with pytest.raises(ValueError, match="ORCH_KEY_PREFIX"):
        to_env(Settings(key_prefix=""))


def test_unset_or_empty_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in to_env(EVERYTHING):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ORCH_TOKENS_FILE", raising=False)
    monkeypatch.setenv("ORCH_DEPTH", "")
    monkeypatch.setenv("ORCH_DESKTOP_IMAGE", "")
    monkeypatch.setenv("ORCH_DEFAULT_SANDBOX", "")
    settings = Settings.from_env()  # os.environ
    assert settings == dataclasses.replace(Settings(), hostname=settings.hostname)
    assert (settings.depth, settings.desktop_image, settings.default_sandbox) == (1, "orchestrator/desktop:dev", None)
    assert settings.max_cpus == float(os.cpu_count() or 1)


def test_a_component_reads_only_its_variables() -> None:
    env = {"ORCH_MAX_JOBS": "not-a-number", "ORCH_API_PORT": "81", "ORCH_SANDBOX_LOST_AFTER": "1"}
    assert ApiSettings.from_env(env).api_port == 81
    with pytest.raises(ValueError, match="ORCH_MAX_JOBS"):
        WorkerSettings.from_env(env)


def test_variables_parse_as_before() -> None:
    settings = Settings.from_env(
        {
            "ORCH_REGISTRY": " registry:5000 , mirror:5000",
            "ORCH_FIREWALL": "Yes",
            "ORCH_SANDBOX_LABELS": "gpu=true, zone=a",
            "ORCH_DESKTOP_DENY": "10.96.0.1/12",
            "REDIS_SENTINELS": " s1:26379 , [::1]:26380",
            "ORCH_STOP_TIMEOUT": " 5 ",
        }
    )
    assert settings.registry == "registry:5000"  # the first; start-dockerd trusts them all
    assert settings.firewall is True
    assert settings.sandbox_labels == {"gpu": "true", "zone": "a"}
    assert settings.desktop_deny == ("10.96.0.0/12",)
    assert settings.redis_sentinels == (("s1", 26379), ("::1", 26380))
    assert settings.stop_timeout_s == 5
    assert Settings.from_env({"ORCH_FIREWALL": "nah"}).firewall is False


def test_tokens_file_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("b:" + "1" * 64 + ":admin")
    settings = ApiSettings.from_env({"ORCH_TOKENS": "a:" + "0" * 64 + ":admin", "ORCH_TOKENS_FILE": str(path)})
    assert settings.tokens == "a:" + "0" * 64 + ":admin;b:" + "1" * 64 + ":admin"


NUMBERS = [
    config.spec_of(f).env for f in env_fields(Settings) if config.spec_of(f).parse in (config._int, config._float)
]


@pytest.mark.parametrize("name", NUMBERS)
def test_a_bad_number_names_its_variable(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be (an integer|a number), got 'twelve'$"):
        Settings.from_env({name: "twelve"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "s1"}, r"^REDIS_SENTINELS must be host:port"),
        ({"ORCH_SANDBOX_LABELS": "gpu"}, r"^ORCH_SANDBOX_LABELS: 'gpu' is not key=value"),
        ({"ORCH_DESKTOP_DENY": "10.0.0.0/33"}, r"^ORCH_DESKTOP_DENY: '10.0.0.0/33' is not a network"),
        ({"ORCH_DESKTOP_ALLOW": "x"}, r"^ORCH_DESKTOP_ALLOW: 'x' is not a network"),
        ({"ORCH_REGISTRY_CREDENTIALS": "no-colon-s3cret"}, r"^ORCH_REGISTRY_CREDENTIALS must be user:password$"),
        ({"ORCH_DEFAULT_TTL_ACTION": "pause"}, r"^ORCH_DEFAULT_TTL_ACTION must be stop or delete, got 'pause'"),
        ({"ORCH_SANDBOX_LOST_AFTER": "5"}, r"^ORCH_SANDBOX_LOST_AFTER \(5 s\) must exceed ORCH_HEARTBEAT_INTERVAL"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_checks_run_for_each_component() -> None:
    with pytest.raises(ValueError, match="ORCH_DEFAULT_TTL_ACTION"):
        ApiSettings(default_ttl_action="pause")
    with pytest.raises(ValueError, match="ORCH_SANDBOX_LOST_AFTER"):
        WorkerSettings(lost_after_s=1.0)
    with pytest.raises(ValueError, match="ORCH_SANDBOX_LOST_AFTER"):
        dataclasses.replace(EVERYTHING, lost_after_s=0.5)


def test_the_poll_fallback_is_shorter_than_the_socket_timeout() -> None:
    """The idle worker's BLPOP waits that long for its reply: past the socket timeout every
    idle wait would fail as a Redis outage."""
    with pytest.raises(ValueError, match="ORCH_POLL_FALLBACK"):
        WorkerSettings.from_env({"ORCH_POLL_FALLBACK": "30", "ORCH_REDIS_SOCKET_TIMEOUT": "30"})
    with pytest.raises(ValueError, match="ORCH_POLL_FALLBACK"):
        WorkerSettings.from_env({"ORCH_POLL_FALLBACK": "-1"})
    assert WorkerSettings.from_env({"ORCH_POLL_FALLBACK": "0"}).poll_fallback_s == 0  # polling, as before
    assert WorkerSettings().poll_fallback_s == 1.0


def test_the_free_disk_watermark_is_never_negative() -> None:
    with pytest.raises(ValueError, match="ORCH_SANDBOX_MIN_FREE_DISK_MB"):
        WorkerSettings.from_env({"ORCH_SANDBOX_MIN_FREE_DISK_MB": "-1"})
    assert WorkerSettings.from_env({"ORCH_SANDBOX_MIN_FREE_DISK_MB": "0"}).min_free_disk_mb == 0
    assert WorkerSettings().min_free_disk_mb == 2048


def test_secrets_stay_out_of_repr() -> None:
    shown = repr(EVERYTHING)
    assert "p%40ss" not in shown
    assert "sentinel-pass" not in shown
    assert "pull-s3cret" not in shown


def test_the_readme_has_the_generated_table() -> None:
    """``python -m orchestrator.config`` prints it; paste it into README's Configuration."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = config.table()
    assert table in readme
    for field in env_fields(Settings):
        assert f"| `{config.spec_of(field).env}` |" in table


def test_the_sse_reader_blocks_for_less_than_the_redis_socket_timeout() -> None:
    with pytest.raises(ValueError, match="ORCH_SSE_KEEPALIVE"):
        Settings(sse_keepalive_s=30.0, redis_socket_timeout_s=30.0)
    Settings(sse_keepalive_s=29.0, redis_socket_timeout_s=30.0)


def test_event_streams_leave_room_for_other_requests() -> None:
    with pytest.raises(ValueError, match="ORCH_SSE_MAX_STREAMS"):
        Settings(sse_max_streams=100, max_connections=100)
