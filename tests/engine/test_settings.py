"""Settings: defaults, --config file, DEW_* variables, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.settings import build_settings, default_config_text, load_settings

DEFAULTS = default_config_text()


def test_embedded_defaults() -> None:
    s = build_settings(DEFAULTS)
    assert s.state_dir == Path("var")
    assert s.db_path == Path("var/dew.sqlite3")
    assert s.redis_url == f"unix://{Path.cwd()}/var/run/redis.sock"
    assert s.redis.queue == "arq:queue"
    assert s.retry.max_tries == 5


def test_precedence_env_over_file_over_defaults() -> None:
    file = "[worker]\nmax_jobs = 7\npoll_delay = 0.2\n"
    s = build_settings(DEFAULTS, file, "f.toml", {"DEW_WORKER_MAX_JOBS": "9"})
    assert s.worker.max_jobs == 9
    assert s.worker.poll_delay == 0.2


def test_shortcuts() -> None:
    s = build_settings(
        DEFAULTS, environ={"DEW_STATE_DIR": "/srv/dew", "DEW_REDIS_URL": "redis://h:1/2"}
    )
    assert s.state_dir == Path("/srv/dew")
    assert s.redis_url == "redis://h:1/2"


def test_unrelated_dew_variables_are_ignored() -> None:
    assert build_settings(DEFAULTS, environ={"DEW_HSM_PIN": "1234"}).worker.max_jobs == 100


@pytest.mark.parametrize(
    ("file", "env", "message"),
    [
        ("[worker\n", {}, "not valid TOML"),
        ("[nope]\nx = 1\n", {}, "unknown section [nope]"),
        ("[worker]\nmax_job = 1\n", {}, "unknown setting worker.max_job"),
        ("[worker]\nmax_jobs = 'many'\n", {}, "worker.max_jobs must be a whole number"),
        (None, {"DEW_WORKER_POLL_DELAY": "soon"}, "worker.poll_delay must be a number"),
        (None, {"DEW_WORKER_MAX_JOBS": "0"}, "worker.max_jobs must be at least 1"),
        (None, {"DEW_SWEEPER_INTERVAL": "7"}, "sweeper.interval must divide 60"),
        (None, {"DEW_REDIS_URL": "http://x"}, "redis.url must start with"),
        (None, {"DEW_LOG_CONSOLE": "loud"}, "log.console"),
    ],
)
def test_bad_settings_name_the_problem(
    file: str | None, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_settings(DEFAULTS, file, "f.toml", env)
    assert message in str(err.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml")


def test_a_tcp_redis_must_ask_for_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.queue import redis_settings

    monkeypatch.delenv("DEW_REDIS_PASSWORD", raising=False)
    bare = build_settings(DEFAULTS, environ={"DEW_REDIS_URL": "redis://127.0.0.1:6390/0"})
    with pytest.raises(ConfigError, match="reached over TCP without a password"):
        redis_settings(bare)
    assert redis_settings(build_settings(DEFAULTS)).password is None  # the private socket
    in_url = build_settings(DEFAULTS, environ={"DEW_REDIS_URL": "redis://:s3cret@h:1/0"})
    assert redis_settings(in_url).password == "s3cret"
    secret = tmp_path / "redis.pw"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    from_file = bare.replace(redis={"password_file": str(secret)})
    with pytest.raises(ConfigError, match="readable by others"):
        redis_settings(from_file)
    secret.chmod(0o600)
    assert redis_settings(from_file).password == "from-file"
    monkeypatch.setenv("DEW_REDIS_PASSWORD", "from-env")
    assert redis_settings(bare).password == "from-env"
