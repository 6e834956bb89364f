"""Settings: defaults, TOML file, env vars, overrides, and clear failures on bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config import ConfigError, load_settings
from pigeon.domain.limits import RateRules


def test_defaults_match_the_product_limits() -> None:
    s = load_settings(None)
    limits = s.limits.to_limits()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert (limits.max_devices_per_user, limits.group_cap, limits.max_body_bytes) == (3, 100, 65536)
    assert limits.retention_seconds == 30 * 86400
    assert (s.gateway.ping_interval, s.gateway.idle_timeout) == (30.0, 60.0)
    assert s.rate_limits.to_rules() == RateRules()  # the settings' strings say the same


def test_precedence_file_then_env_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "pigeon.toml"
    toml.write_text(
        'port = 9000\nhost = "0.0.0.0"\n[limits]\ngroup_cap = 50\nmax_body_bytes = 10\n'
    )
    monkeypatch.setenv("PIGEON_LIMITS__GROUP_CAP", "20")
    monkeypatch.setenv("PIGEON_HOST", "127.0.0.2")
    s = load_settings(toml, host="127.0.0.3")
    assert s.port == 9000  # file
    assert s.limits.group_cap == 20  # env beats file
    assert s.limits.max_body_bytes == 10  # file value kept beside env's sibling
    assert s.host == "127.0.0.3"  # explicit override beats env


def test_bad_config_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIGEON_LIMITS__GROUP_CAP", "1")
    with pytest.raises(ConfigError, match="group_cap"):
        load_settings(None)


def test_frame_limits_must_be_ordered() -> None:
    with pytest.raises(ConfigError, match="hard_frame_limit"):
        load_settings(None, gateway={"max_frame_bytes": 10_000, "hard_frame_limit": 5_000})


def test_store_type_selects_the_adapter_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None, store={"synchronous": "NORMAL"}).store.type == "sqlite"
    monkeypatch.setenv("PIGEON_STORE__TYPE", "postgres")
    monkeypatch.setenv("PIGEON_STORE__DSN", "postgresql://u@db:5432/chat")
    store = load_settings(None).store
    assert (store.type, getattr(store, "dsn", None)) == ("postgres", "postgresql://u@db:5432/chat")
    with pytest.raises(ConfigError):
        load_settings(None, store={"type": "postgres", "min_connections": 5, "max_connections": 2})


def test_workers_need_shared_state() -> None:
    from pigeon.supervisor import WorkersNeedSharedState, check_workers

    check_workers(load_settings(None), 1)  # one process: anything goes
    with pytest.raises(WorkersNeedSharedState) as err:
        check_workers(load_settings(None, bus={"type": "redis"}), 2)
    assert "PIGEON_STORE__TYPE=postgres" in str(err.value)
    assert "PIGEON_BUS__TYPE" not in str(err.value)
    shared = load_settings(
        None, store={"type": "postgres"}, bus={"type": "redis"}, presence={"type": "redis"}
    )
    check_workers(shared, 2)


def test_env_values_merge_into_file_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "pigeon.toml"
    toml.write_text('[store]\ntype = "postgres"\ndsn = "postgresql://file/db"\n')
    monkeypatch.setenv("PIGEON_STORE__DSN", "postgresql://env/db")
    store = load_settings(toml).store
    assert (store.type, getattr(store, "dsn", None)) == ("postgres", "postgresql://env/db")


def test_session_ttl_must_cover_the_grace() -> None:
    with pytest.raises(ConfigError, match="session_ttl"):
        load_settings(None, presence={"grace": 10, "session_ttl": 5})


def test_a_typo_inside_a_section_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "pigeon.toml"
    toml.write_text("[limits]\ngroupcap = 5\n")
    with pytest.raises(ConfigError, match=r"limits\.groupcap \(PIGEON_LIMITS__GROUPCAP\)"):
        load_settings(toml)
    monkeypatch.setenv("PIGEON_GATEWAY__PINGINTERVAL", "3")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(None)


def test_a_setting_of_another_engine_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"store\.dsn"):
        load_settings(None, store={"dsn": "postgresql://x/y"})  # the store is SQLite


def test_log_levels_are_checked_and_case_blind(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None, log_level="debug").log_level == "DEBUG"
    monkeypatch.setenv("PIGEON_LOG_LEVEL", "verbose")
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(None)


def test_a_missing_or_broken_config_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_key_directory_limits_are_read_from_their_env_vars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The names docs/operations.md and docs/protocol.md give are the ones read."""
    for name, value in {
        "KEY_UPLOADS_PER_DEVICE": "7/minute",
        "KEY_QUERIES_PER_DEVICE": "8/minute",
        "KEY_CLAIMS_PER_DEVICE": "9/10s",
        "KEY_CLAIMS_PER_USER": "11/hour",
        "KEY_CLAIMS_PER_TARGET": "4/day",
    }.items():
        monkeypatch.setenv(f"PIGEON_RATE_LIMITS__{name}", value)
    rules = load_settings(None).rate_limits.to_rules()
    assert (rules.key_uploads_per_device.amount, rules.key_queries_per_device.amount) == (7, 8)
    assert (rules.key_claims_per_device.amount, rules.key_claims_per_device.seconds) == (9, 10)
    assert (rules.key_claims_per_user.amount, rules.key_claims_per_user.seconds) == (11, 3600)
    assert (rules.key_claims_per_target.amount, rules.key_claims_per_target.seconds) == (4, 86400)


def test_a_target_limit_must_reach_every_device_of_a_user() -> None:
    """Each device of a user claims one key of a device it starts a session with: fewer than
    `max_devices_per_user` would silently leave some of them without a session."""
    load_settings(None, limits={"max_devices_per_user": 10})  # the default, 10/hour, fits
    with pytest.raises(ConfigError, match=r"PIGEON_RATE_LIMITS__KEY_CLAIMS_PER_TARGET") as err:
        load_settings(None, limits={"max_devices_per_user": 11})
    assert "max_devices_per_user (11)" in str(err.value)
    assert "PIGEON_)" not in str(err.value)  # a rule across sections names its own settings
    load_settings(  # raised together, or with the limits off
        None, limits={"max_devices_per_user": 11}, rate_limits={"key_claims_per_target": "20/h"}
    )
    load_settings(None, limits={"max_devices_per_user": 11}, rate_limits={"enabled": False})
