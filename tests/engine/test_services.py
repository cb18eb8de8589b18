"""Service discovery: the configured list, the services' settings sections, the cron table."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.cron import ScheduleEntry, cron_table
from engine.errors import ConfigError
from engine.services import configured_packages, default_config_text, load_specs
from engine.settings import Settings, build_settings
from handlers.csms.config import CsmsSettings
from handlers.kms.config import KmsSettings
from handlers.kps.config import KpsSettings
from schedules.cli import when
from tests.helpers import run_dew

DEFAULTS = default_config_text()
ALL = ("handlers.builtin", "handlers.kms", "handlers.csms", "handlers.kps", "schedules")


async def _nothing(state: object) -> None:
    return None


def test_the_default_services_and_their_sections() -> None:
    s = build_settings(DEFAULTS)
    assert s.engine.services == ALL
    assert [spec.name for spec in load_specs(s.engine.services)] == [
        "builtin", "kms", "csms", "kps", "schedules"]
    assert s.section(KmsSettings).quota == 100
    assert s.section(KpsSettings).batch_limit == 100
    assert set(s.sections()) >= {"engine", "worker", "kms", "csms", "kps"}


def test_the_cheap_reader_agrees_with_the_settings(tmp_path: Path) -> None:
    assert configured_packages(None, {}) == ALL
    assert configured_packages(None, {"DEW_ENGINE_SERVICES": " handlers.kms , handlers.kps"}) \
        == ("handlers.kms", "handlers.kps")
    # Written in any TOML form, a config file wins over the defaults.
    config = tmp_path / "c.toml"
    config.write_text('[redis]\nqueue = "q"\n\n[engine]\nservices = [\n  "handlers.kms",\n]\n')
    assert configured_packages(str(config), {}) == ("handlers.kms",)
    assert configured_packages(str(tmp_path / "missing.toml"), {}) == ALL


def test_a_section_is_settable_only_while_its_service_is_configured() -> None:
    env = {"DEW_ENGINE_SERVICES": "handlers.builtin,handlers.kms", "DEW_KPS_QUOTA": "7"}
    s = build_settings(DEFAULTS, environ=env)  # [kps] of the defaults: skipped, not refused
    assert s.engine.services == ("handlers.builtin", "handlers.kms")
    assert "kps" not in s.services
    with pytest.raises(ConfigError, match="no settings section KpsSettings"):
        s.section(KpsSettings)
    with pytest.raises(ConfigError, match=r"f.toml: unknown section \[kps\]"):
        build_settings(DEFAULTS, "[kps]\nquota = 3\n", "f.toml", env)


@pytest.mark.parametrize(("text", "message"), [
    ("[kps]\nconcurrency = 0\n", "kps.concurrency must be between 1 and 1000"),
    ("[csms]\nscheduler_interval = 7\n", "csms.scheduler_interval must divide 60"),
    ("[kms]\nquota = 0\n", "kms.quota must be between 1 and 100000"),
    ("[engine]\nservices = [1]\n", "engine.services must be a list of strings"),
    ('[engine]\nservices = ["handlers.nope"]\n', "'handlers.nope', which is not an installed"),
    ('[engine]\nservices = ["engine.models"]\n', "'engine.models', which declares no SERVICE"),
    ('[engine]\nservices = ["handlers.kms", "handlers.kms"]\n', "two packages in engine"),
])
def test_bad_service_settings_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build_settings(DEFAULTS, text, "f.toml")


def test_service_sections_by_environment() -> None:
    s = build_settings(DEFAULTS, environ={"DEW_CSMS_DB_TIMEOUT": "2.5", "DEW_KMS_QUOTA": "5"})
    assert s.section(CsmsSettings).db_timeout == 2.5
    assert s.section(KmsSettings).quota == 5
    assert s.replace(kms={"quota": 9}).section(KmsSettings).quota == 9


def test_next_run_and_the_cron_table(settings: Settings) -> None:
    entry = ScheduleEntry("x", _nothing, second=frozenset({30}))
    at = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert entry.next_run(at) == datetime(2026, 1, 1, 12, 1, 30, tzinfo=UTC)
    hourly = ScheduleEntry("y", _nothing, second=frozenset({0}), minute=frozenset({15}))
    assert hourly.next_run(at) == datetime(2026, 1, 1, 12, 15, 0, tzinfo=UTC)
    assert when(frozenset(range(0, 60, 5)), None) == "every 5 seconds"
    assert when(frozenset({30}), None) == "at second 30"
    assert when(frozenset({0}), frozenset({15})) == "at minute 15, at second 0"

    names = [e.name for e in cron_table(settings)]
    assert names == ["engine.sweep_outbox", "kms.delete_due_keys", "kms.rotate_due_keys",
                     "csms.enqueue_due_rotations", "csms.delete_due_secrets",
                     "schedules.fire_due"]
    only_kps = settings.replace(engine={"services": ["handlers.kps"]})
    assert [e.name for e in cron_table(only_kps)] == ["engine.sweep_outbox"]


def test_dew_schedules_list(settings: Settings) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    done = run_dew(settings, "schedules", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows][:2] == ["engine.sweep_outbox", "kms.delete_due_keys"]
    for row in rows:  # due within the next minute of when the command ran
        assert 0 < (datetime.fromisoformat(row["next_run"]) - before).total_seconds() <= 65
    text = run_dew(settings, "schedules", "list")
    assert text.returncode == 0
    assert text.stdout.splitlines()[1].split()[:3] == [  # the tests' sweeper: every second
        "engine.sweep_outbox", "every", "second"]


def test_every_job_that_needs_arguments_names_them(settings: Settings) -> None:
    """`dew jobs` and the API's ListJobs show each job's argument fields."""
    from engine.errors import InvalidInput
    from engine.registry import default_registry

    registry = default_registry(settings)
    for spec in registry:
        try:
            if spec.validate is not None:
                spec.validate({})
        except InvalidInput:
            assert spec.fields, f"{spec.name} takes arguments but declares no fields"
    listed = {j["name"]: j for j in json.loads(run_dew(settings, "jobs", "--json").stdout)}
    assert {"keypair", "servers", "auth", "disable_pw_login"} <= set(listed["kps.bind"]["fields"])
    assert listed["kps.bind"]["secret_fields"] == ["auth"]
