"""Pure CSMS rules: names, values, stages, periods, generated values, the rotation
state machine and the scheduler's task ids."""

from __future__ import annotations

import json
import string

import pytest

from engine.client import check_task_id
from engine.errors import InvalidInput
from handlers.csms import model as m
from handlers.csms.rotation import RotationState, Step, StepOutcome, advance, plan
from handlers.csms.rotators import scram_verifier
from handlers.csms.service import rotation_task_id


@pytest.mark.parametrize("name", ["a", "db.prod-1_x", "A" * 64])
def test_good_names(name: str) -> None:
    assert m.check_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "x/y", "A" * 65, "é", None, 3])
def test_bad_names(name: object) -> None:
    with pytest.raises(InvalidInput, match="invalid secret name"):
        m.check_name(name)


def test_value_limits() -> None:
    assert m.check_value(b"x" * m.MAX_VALUE_BYTES, m.SecretType.COMMON)
    with pytest.raises(InvalidInput, match="over 32768 bytes") as err:
        m.check_value(b"s3cr3t" * 6000, m.SecretType.COMMON)
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(InvalidInput, match="empty"):
        m.check_value(b"", m.SecretType.COMMON)


def test_db_document_rules() -> None:
    doc = {"engine": "postgresql", "host": "h", "port": 5432, "username": "u",
           "password": "hunter2", "dbname": "d"}
    parsed = m.parse_db_document(json.dumps(doc).encode(), m.SecretType.RDS_POSTGRESQL)
    assert parsed.endpoint == "h:5432" and "hunter2" not in repr(parsed)
    assert json.loads(parsed.with_password("new").to_bytes())["password"] == "new"
    for bad in ({**doc, "port": 0}, {**doc, "engine": "mysql"}, {**doc, "password": ""},
                [1, 2]):
        with pytest.raises(InvalidInput) as err:
            m.check_value(json.dumps(bad).encode(), m.SecretType.RDS_POSTGRESQL)
        assert "hunter2" not in err.value.message
    m.parse_db_document(json.dumps({**doc, "engine": "mariadb"}).encode(),
                        m.SecretType.RDS_MYSQL)


@pytest.mark.parametrize(("text", "seconds"), [("6h", 6 * 3600), ("8760h", 8760 * 3600),
                                               ("30d", 30 * 86400)])
def test_periods(text: str, seconds: int) -> None:
    assert m.parse_period(text) == seconds


@pytest.mark.parametrize("text", ["5h", "8761h", "366d", "1w", "", "h"])
def test_bad_periods(text: str) -> None:
    with pytest.raises(InvalidInput, match="between 6h and 8760h"):
        m.parse_period(text)


@pytest.mark.parametrize("days", [6, 31, True, "7"])
def test_recovery_days(days: object) -> None:
    with pytest.raises(InvalidInput):
        m.check_recovery_days(days)
    assert m.check_recovery_days(7) == 7 and m.check_recovery_days(30) == 30


def test_generate_length_and_charset() -> None:
    value = m.generate_value(40, m.check_charset("hex"))
    assert len(value) == 40 and set(value) <= set("0123456789abcdef")
    safe = m.generate_value(64)
    assert set(safe) <= set(string.ascii_letters + string.digits + m.SAFE_SYMBOLS)
    assert "'" not in m.CHARSETS["alphanumeric-symbols"]
    with pytest.raises(InvalidInput):
        m.check_length(7)
    with pytest.raises(InvalidInput):
        m.check_charset("emoji")


def test_a_stage_names_one_version_and_current_hands_over_previous() -> None:
    stages = {m.CURRENT: "v2", m.PREVIOUS: "v1", "TEST": "v1"}
    moved = m.move_stage(stages, "TEST", "v2")
    assert moved == {m.CURRENT: "v2", m.PREVIOUS: "v1", "TEST": "v2"}
    assert m.move_stage(stages, m.CURRENT, "v3") == {m.CURRENT: "v3", m.PREVIOUS: "v2",
                                                     "TEST": "v1"}
    assert m.move_stage(stages, m.CURRENT, "v2") == stages
    assert m.stages_of(m.move_stage(stages, m.CURRENT, "v1"), "v1") == [m.CURRENT, "TEST"]


@pytest.mark.parametrize("stage", [m.CURRENT, m.PREVIOUS])
def test_protected_stages_are_never_removed(stage: str) -> None:
    with pytest.raises(InvalidInput, match=f"{stage} cannot be removed"):
        m.remove_stage({m.CURRENT: "v1", m.PREVIOUS: "v1"}, stage)


def test_remove_stage() -> None:
    assert m.remove_stage({m.CURRENT: "v1", "X": "v1"}, "X") == {m.CURRENT: "v1"}
    with pytest.raises(InvalidInput, match="not on v2"):
        m.remove_stage({"X": "v1"}, "X", "v2")
    with pytest.raises(InvalidInput, match="no version has"):
        m.remove_stage({}, "X")


def test_rotation_runs_four_steps_in_order() -> None:
    state = RotationState()
    assert plan(state) == [Step.CREATE, Step.SET, Step.TEST, Step.FINISH]
    state = advance(state, StepOutcome(Step.CREATE, True, "v3"))
    assert (state.done, state.pending_version, state.next_step) == (Step.CREATE, "v3", Step.SET)
    state = advance(state, StepOutcome(Step.SET, True))
    assert state.target_changed and plan(state) == [Step.TEST, Step.FINISH]
    state = advance(state, StepOutcome(Step.TEST, True))
    state = advance(state, StepOutcome(Step.FINISH, True))
    assert state.finished and state.next_step is None and state.pending_version is None


def test_rotation_failure_keeps_the_resume_point_or_goes_back_after_rollback() -> None:
    after_set = RotationState(Step.SET, "v3")
    assert advance(after_set, StepOutcome(Step.TEST, False)) == after_set
    assert advance(after_set, StepOutcome(Step.TEST, False, rolled_back=True)) == \
        RotationState(Step.CREATE, "v3")
    created = RotationState(Step.CREATE, "v3")
    assert advance(created, StepOutcome(Step.SET, False, rolled_back=True)) == created
    with pytest.raises(ValueError, match="cannot follow"):
        advance(created, StepOutcome(Step.FINISH, True))


def test_rotation_task_ids_are_deterministic_and_valid() -> None:
    a = rotation_task_id("default", "db1", 1_800_000_000)
    assert a == "csms.rotate:default:db1:1800000000" == check_task_id(a)
    b = rotation_task_id("team@corp", "x" * 64, 1)
    assert check_task_id(b) and b == rotation_task_id("team@corp", "x" * 64, 1)
    assert b != rotation_task_id("team@corp", "x" * 64, 2)


def test_scram_verifier_shape() -> None:
    v = scram_verifier("pw", salt=b"0123456789abcdef")
    assert v.startswith("SCRAM-SHA-256$4096:") and "pw" not in v.split("$", 1)[1][:5]


# --------------------------------------------------------------------------- TLS (M5)

_PG = {"engine": "postgresql", "host": "db", "port": 5432, "username": "u",
       "password": "hunter2", "dbname": "d"}


def _tls(**fields: object) -> m.TlsPolicy:
    return m.parse_db_document(json.dumps({**_PG, **fields}).encode(),
                               m.SecretType.RDS_POSTGRESQL).tls


def test_tls_defaults_to_verify_full_and_maps_the_older_ssl_field() -> None:
    from tests.csms.pki import Ca

    assert _tls() == m.TlsPolicy(m.TlsMode.VERIFY_FULL)
    assert _tls().enabled and _tls().check_hostname and _tls().trust == "the system CA store"
    assert not _tls(tls="verify-ca").check_hostname
    assert not _tls(tls="disable").enabled
    # "ssl" as documented before "tls": false/"disable" keep plaintext (asked for on
    # purpose); every mode that allowed a fallback or skipped the check now verifies.
    assert _tls(ssl=False).mode is m.TlsMode.DISABLE
    assert _tls(ssl="disable").mode is m.TlsMode.DISABLE
    for old in (True, "prefer", "allow", "require", "verify-full"):
        assert _tls(ssl=old).mode is m.TlsMode.VERIFY_FULL
    assert _tls(ssl="verify-ca").mode is m.TlsMode.VERIFY_CA
    assert _tls(ssl=False, tls="disable").mode is m.TlsMode.DISABLE
    pem = Ca.make("model test").pem
    assert _tls(tls_ca=pem).ca_pem == pem and "tls_ca" in _tls(tls_ca=pem).trust
    assert _tls(tls_ca_file="/etc/ssl/db-ca.pem").ca_file == "/etc/ssl/db-ca.pem"
    doc = m.parse_db_document(json.dumps({**_PG, "tls_ca": pem}).encode(),
                              m.SecretType.RDS_POSTGRESQL)
    # A rotated version keeps the fields as written.
    assert json.loads(doc.with_password("new").to_bytes())["tls_ca"] == pem
    assert "hunter2" not in repr(doc) and "verify-full" in repr(doc)
    # A unix socket has no TLS: only with the explicit opt-out.
    with pytest.raises(InvalidInput, match="unix socket"):
        _tls(host="/var/run/postgresql")
    assert not _tls(host="/var/run/postgresql", tls="disable").enabled


@pytest.mark.parametrize(("fields", "words"), [
    ({"tls": "prefer"}, "tls must be one of"),
    ({"tls": True}, "tls must be one of"),
    ({"ssl": "sometimes"}, "ssl must be"),
    ({"ssl": 1.5}, "ssl must be"),
    ({"tls": "verify-full", "ssl": False}, "disagree"),
    ({"tls_ca": "not a certificate"}, "not PEM"),
    ({"tls_ca": ""}, "PEM text"),
    ({"tls_ca": 42}, "PEM text"),
    ({"tls_ca_file": "relative/ca.pem"}, "absolute path"),
    ({"tls_ca_file": "/a", "tls_ca": "x"}, "not both"),
    ({"tls": "disable", "tls_ca_file": "/etc/ca.pem"}, "need TLS"),
])
def test_bad_tls_fields_are_refused_with_the_field_named(fields: dict[str, object],
                                                         words: str) -> None:
    for kind, engine in ((m.SecretType.RDS_POSTGRESQL, "postgresql"),
                         (m.SecretType.RDS_MYSQL, "mariadb")):
        with pytest.raises(InvalidInput, match=words) as err:
            m.check_value(json.dumps({**_PG, "engine": engine, **fields}).encode(), kind)
        assert err.value.code == "invalid_db_document" and "hunter2" not in err.value.message
