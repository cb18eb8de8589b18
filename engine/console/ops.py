"""The console does what the API does: it calls the services' operations by name.

A console page never reads a store or checks a role itself. It names an API
operation (``ListFailures``, ``EnableKey``...) and :meth:`Caller.call` runs it
through :func:`engine.api.app.invoke` with the signed-in user's
:class:`~engine.api.principal.Principal`: the same permission check
(:func:`~engine.api.operations.authorize`), the same project rate, the same
handler, the same audit entries (the actor says ``ak=console``). What a button
needs is :meth:`Caller.may`, the same check asked beforehand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.api.app import ApiState, invoke
from engine.api.jobs import TASK_HEADER, JobPending
from engine.api.operations import Operation, Reply, authorize, permitted
from engine.api.principal import Principal
from engine.errors import NotFound

# What a console user's Principal carries where an API caller's has its access key.
VIA = "console"


class NotServed(NotFound):
    """The configured services have no operation of that name (a service left out)."""

    code = "operation_not_served"


@dataclass
class Result:
    """What an operation answered: its JSON body and the task it started, if any."""

    body: Any
    status: int = 200
    task_id: str | None = None
    pending: bool = False  # the job did not end within [api] job_wait: it goes on


def operations_by_name(state: ApiState) -> dict[str, Operation]:
    return {route.operation.name: route.operation for route in state.router}


@dataclass
class Caller:
    """One console request's way to the operations, as its signed-in user."""

    state: ApiState
    operations: Mapping[str, Operation]
    principal: Principal
    request_id: str
    calls: list[str] = field(default_factory=list)  # for the request's log line

    def served(self, name: str) -> bool:
        return name in self.operations

    def may(self, name: str) -> bool:
        """Whether the user's roles allow the operation (its button is shown)."""
        operation = self.operations.get(name)
        return operation is not None and permitted(self.principal, operation)

    def require(self, name: str) -> None:
        """The operation's permission check alone (PermissionDenied, as the API)."""
        operation = self.operations.get(name)
        if operation is None:
            raise NotServed(f"the configured services do not serve {name}", target=name)
        authorize(self.principal, operation)

    async def call(self, name: str, *, params: Mapping[str, str] | None = None,
                   query: Mapping[str, str] | None = None, body: Any = None) -> Result:
        """Run operation ``name`` (errors are raised as the API raises them)."""
        operation = self.operations.get(name)
        if operation is None:
            raise NotServed(f"the configured services do not serve {name}", target=name)
        self.calls.append(name)
        headers: dict[str, str] = {}
        raw = b"" if body is None else json.dumps(body).encode()
        all_params = {"project_id": self.principal.project_id, **(params or {})}
        try:
            answer = await invoke(self.state, operation, self.principal, body=raw,
                                  params=all_params, query=dict(query or {}),
                                  request_id=self.request_id, headers=headers)
        except JobPending as pending:
            return Result({"task_id": pending.task.task_id}, 202, pending.task.task_id, True)
        status = 200
        if isinstance(answer, Reply):
            status, headers = answer.status, {**headers, **answer.headers}
            answer = answer.body
        return Result(answer, status, headers.get(TASK_HEADER))
