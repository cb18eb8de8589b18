"""The engine's actions and built-in roles over HTTPS (``handlers/builtin/api.py``).

Enqueuing job ``X.y`` checks the action ``X:jobs:enqueue`` (the job name's first
part), so a service's own wildcard role (``KMS Administrator`` is ``kms:*``)
covers its own jobs; the engine's task and failure endpoints check ``dew:...``
actions. Listed in docs/api.md ("The engine").
"""

from __future__ import annotations

from engine.api.principal import RoleCatalog

ACTIONS = {
    "dew:tasks:list": "list the project's tasks",
    "dew:tasks:get": "show one of the project's tasks",
    "dew:tasks:retry": "retry a failed task (also needs the job's <service>:jobs:enqueue)",
    "dew:failures:list": "list the project's failure records",
    "dew:failures:get": "show one failure record",
    "dew:failures:delete": "delete failure records (one or all)",
    "dew:failures:retry": "retry the failed task of a failure record (also needs the job's "
                          "<service>:jobs:enqueue)",
    "dew:jobs:list": "list the job names and their arguments",
    # Each service declares its own ``<service>:jobs:enqueue`` in its catalog.
    "engine:jobs:enqueue": "enqueue the built-in engine.* jobs",
}

READ_ONLY = ("dew:tasks:list", "dew:tasks:get", "dew:failures:list", "dew:failures:get",
             "dew:jobs:list")

CATALOG = RoleCatalog(
    roles={
        "DEW TaskOperator": ("dew:tasks:*", "dew:failures:*", "dew:jobs:*",
                             "engine:jobs:enqueue"),
        "DEW TaskReadOnlyAccess": READ_ONLY,
    },
    actions=ACTIONS,
)


def enqueue_action(job: str) -> str:
    """The action that lets a caller enqueue (or retry) the job ``job``."""
    return f"{job.partition('.')[0]}:jobs:enqueue"
