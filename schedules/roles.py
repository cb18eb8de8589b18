"""The schedules' actions and built-in roles, as identities (``dew iam``) know them.

Creating a schedule for job ``X.y``, and running one now, also needs the caller's
``X:jobs:enqueue`` (the rule of the engine's enqueue endpoint): a schedule runs
nothing its creator could not enqueue. Listed in docs/api.md.
"""

from __future__ import annotations

from engine.api.principal import RoleCatalog

ACTIONS = {
    "dew:schedules:create": "create a schedule (and the job's <service>:jobs:enqueue)",
    "dew:schedules:list": "list the project's schedules",
    "dew:schedules:get": "show a schedule and its last firings",
    "dew:schedules:update": "pause or resume a schedule",
    "dew:schedules:delete": "delete a schedule",
    "dew:schedules:run": "run a schedule's job now (and the job's <service>:jobs:enqueue)",
}

CATALOG = RoleCatalog(
    roles={
        "DEW ScheduleFullAccess": ("dew:schedules:*",),
        "DEW ScheduleReadOnlyAccess": ("dew:schedules:list", "dew:schedules:get"),
    },
    actions=ACTIONS,
)
