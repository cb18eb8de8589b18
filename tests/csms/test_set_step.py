"""Step ``set`` failing *after* the database applied the password (audit L6): the
connection breaks right after ALTER ROLE. A retry finds the pending password in
force and goes on; a final failure asks the database, records ``set`` and gives
it the current password back, so SYSCURRENT logs in whatever happens."""

from __future__ import annotations

import json

import pytest

from handlers.csms import model as m
from handlers.csms.rotators import DbDocument, Rotator, TargetUnreachable, rotator_for
from handlers.csms.service import SecretsService
from tests.csms.conftest import PgCluster, pg_login

pytestmark = pytest.mark.slow


class BreaksAfterSet:
    """The real rotator, whose connection "breaks" right after the password change
    was applied (``breaks`` times), and which cannot reach the database at all for
    ``down`` further password changes (a failed rollback)."""

    def __init__(self, real: Rotator, breaks: int = 1, down: int = 0) -> None:
        self.real, self.breaks, self.down = real, breaks, down
        self.changes = 0

    async def login(self, doc: DbDocument) -> None:
        await self.real.login(doc)

    async def change_password(self, doc: DbDocument, new_password: str) -> None:
        self.changes += 1
        if self.breaks == 0 and self.down > 0:
            self.down -= 1
            raise TargetUnreachable("the target cannot be reached (injected)", cause="test")
        await self.real.change_password(doc, new_password)
        if self.breaks > 0:
            self.breaks -= 1
            raise TargetUnreachable("connection lost after the statement (injected)",
                                    cause="test")


def _service(csms: SecretsService, rotator: Rotator) -> SecretsService:
    return SecretsService(csms.store, csms.kms, actor="test", db_timeout=2.0,
                          rotators=lambda kind, timeout: rotator)


async def _doc(csms: SecretsService, name: str, stage: str = m.CURRENT) -> dict[str, object]:
    doc: dict[str, object] = json.loads((await csms.get_value(name, stage=stage)).value)
    return doc


async def _secret(csms: SecretsService, pg_cluster: PgCluster, name: str) -> dict[str, object]:
    await pg_cluster.create_user(name, f"{name}-pw")
    doc = pg_cluster.tls_document(name, f"{name}-pw")
    await csms.create(name, json.dumps(doc).encode(), secret_type="RDS_POSTGRESQL")
    return doc


async def test_retry_after_set_applied_finds_the_password_in_force(
    csms: SecretsService, pg_cluster: PgCluster,
) -> None:
    original = await _secret(csms, pg_cluster, "l6_retry")
    broken = _service(csms, BreaksAfterSet(rotator_for(m.SecretType.RDS_POSTGRESQL, 2.0)))
    with pytest.raises(TargetUnreachable):
        await broken.rotate("l6_retry", final_attempt=False)  # retryable: not recorded
    pending = await _doc(csms, "l6_retry", m.PENDING)
    assert await pg_login(pending) is True and await pg_login(original) is False

    # The retry cannot change the password as SYSCURRENT any more (it no longer logs
    # in, and there is no SYSPREVIOUS): it succeeds only by finding it in force.
    done = await csms.rotate("l6_retry")
    assert done["resumed_after"] == "create" and done["steps"] == ["set", "test", "finish"]
    current = await _doc(csms, "l6_retry")
    assert current == pending and await pg_login(current) is True
    assert (await csms.describe("l6_retry")).record.failed_rotations == 0


async def test_final_failure_after_set_applied_restores_the_current_password(
    csms: SecretsService, pg_cluster: PgCluster,
) -> None:
    original = await _secret(csms, pg_cluster, "l6_final")
    rotator = BreaksAfterSet(rotator_for(m.SecretType.RDS_POSTGRESQL, 2.0))
    with pytest.raises(TargetUnreachable):
        await _service(csms, rotator).rotate("l6_final", final_attempt=True)
    assert rotator.changes == 2  # the set, then the rollback
    assert await pg_login(original) is True  # SYSCURRENT works again
    assert await pg_login(await _doc(csms, "l6_final", m.PENDING)) is False
    info = (await csms.describe("l6_final")).to_json()
    assert info["stages"][m.CURRENT] == "v1" and info["failed_rotations"] == 1
    assert info["last_failure"]["step"] == "set" and info["last_failure"]["rolled_back"]
    assert info["rotation"]["in_progress"]["last_step_done"] == "create"

    done = await csms.rotate("l6_final")  # the next rotation goes through
    assert done["steps"] == ["set", "test", "finish"]
    assert await pg_login(await _doc(csms, "l6_final")) is True


async def test_final_failure_without_rollback_records_set_for_the_next_run(
    csms: SecretsService, pg_cluster: PgCluster,
) -> None:
    original = await _secret(csms, pg_cluster, "l6_stuck")
    rotator = BreaksAfterSet(rotator_for(m.SecretType.RDS_POSTGRESQL, 2.0), down=1)
    with pytest.raises(TargetUnreachable):
        await _service(csms, rotator).rotate("l6_stuck", final_attempt=True)
    assert await pg_login(original) is False  # the rollback could not reach the database
    info = (await csms.describe("l6_stuck")).to_json()
    assert info["last_failure"]["rolled_back"] is False
    # What the database holds is recorded: the next run only tests and finishes.
    assert info["rotation"]["in_progress"]["last_step_done"] == "set"
    done = await csms.rotate("l6_stuck")
    assert done["resumed_after"] == "set" and done["steps"] == ["test", "finish"]
    assert await pg_login(await _doc(csms, "l6_stuck")) is True
