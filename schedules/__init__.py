"""Schedules: the operator's view of the cron table (``dew schedules list``).

The table itself is assembled by ``engine.cron`` from the engine's own entry
and what each configured service declares in its ``schedules`` module
(``handlers/kms/schedules.py``, ``handlers/csms/schedules.py``). This package
is found like a service (``[engine] services``), so the engine never imports it.
"""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "schedules",
    title="the cron table",
    commands={"schedules": "the cron table: what the workers run on a clock, and when next"},
    cli="schedules.cli",
)
