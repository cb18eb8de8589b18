"""Schedules: the cron table and the users' schedules.

The built-in table is assembled by ``engine.cron`` from the engine's own entry
and what each configured service declares in its ``schedules`` module. Users add
their own schedules (a job and its arguments on a cron expression in a time
zone), fired by this package's cron entry. Modules: ``store`` (SQLite, its own
migrations), ``service`` (checks, due slots, firing), ``jobs`` (the
``schedules.fire_due`` job and resources), ``cron`` (the cron entry), ``cli``
(``dew schedules``), ``api`` (``/v1/{project_id}/dew/schedules``), ``roles``.
This package is found like a service (``[engine] services``), so the engine
never imports it. See docs/schedules.md.
"""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "schedules",
    title="the cron table and user schedules",
    commands={"schedules": "the cron table and user schedules: what runs when, next"},
    cli="schedules.cli",
    jobs="schedules.jobs",
    schedules="schedules.cron",
    api="schedules.api",
    roles="schedules.roles:CATALOG",
)
