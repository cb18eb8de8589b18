"""Jobs from API calls: one engine Client per API process, a runner per call.

``call.jobs.run(name, args)`` enqueues through the signed, sealed path of
:class:`engine.client.Client` (outbox row first, secret fields sealed, HSM
signature) and waits for the task at most ``[api] job_wait`` seconds. The task
id goes into the reply's ``X-Dew-Task-Id`` header in every case. When the wait
runs out, :class:`JobPending` is raised (a TransientError, code
``wait_timeout``); unless the handler catches it, the server answers **202**
with ``{"task_id": ..., "task_status": ...}``: the job goes on, and
``dew tasks show ID`` (or a later call) tells its end. A handler reads a final
task with :func:`task_result`, which raises the task's error as an engine error.
"""

from __future__ import annotations

from typing import Any

from engine.api.principal import Principal
from engine.client import Client
from engine.errors import DewError, TransientError
from engine.models import TaskRecord
from engine.registry import default_registry
from engine.resources import Resources
from engine.settings import Settings
from engine.store import open_store

TASK_HEADER = "X-Dew-Task-Id"


class JobPending(TransientError):
    """The job did not end within ``[api] job_wait``: answered 202 with its task id."""

    code = "wait_timeout"

    def __init__(self, task: TaskRecord, waited: float) -> None:
        super().__init__(f"task {task.task_id} is still {task.status} after {waited:g} s",
                         code="wait_timeout", target=task.task_id,
                         fix=f"Look later with `dew tasks show {task.task_id}`.")
        self.task = task


class ProcessJobs:
    """The API process's client: opened at start-up, closed at shutdown. It shares
    the process's resources (one crypto core, one sealer, one job signer)."""

    def __init__(self, client: Client, wait: float) -> None:
        self.client = client
        self.wait = wait

    @classmethod
    async def open(cls, settings: Settings, resources: Resources) -> ProcessJobs:
        store = await open_store(settings)
        client = Client(settings, store, None, default_registry(settings))
        client.resources = resources
        return cls(client, settings.api.job_wait)

    def for_call(self, principal: Principal, headers: dict[str, str]) -> CallJobs:
        return CallJobs(self, principal, headers)

    async def close(self) -> None:
        # The resources are the process's: closed by their owner, not by the client.
        self.client.resources = Resources(self.client.settings)
        await self.client.close()


class CallJobs:
    """The :class:`~engine.api.operations.JobRunner` of one call."""

    def __init__(self, jobs: ProcessJobs, principal: Principal,
                 headers: dict[str, str]) -> None:
        self._jobs = jobs
        self._headers = headers
        # Tasks belong to the project that enqueued them: the caller's.
        self.project = principal.project

    @property
    def client(self) -> Client:
        """The process's engine client (the builtin service's task endpoints)."""
        return self._jobs.client

    def named(self, task: TaskRecord) -> TaskRecord:
        """Name ``task`` in the reply's ``X-Dew-Task-Id`` header; the task."""
        self._headers[TASK_HEADER] = task.task_id
        return task

    async def enqueue(self, name: str, args: dict[str, Any],
                      task_id: str | None = None, defer: float | None = None) -> TaskRecord:
        """Enqueue without waiting (the reply names the task; the job goes on)."""
        return self.named(await self._jobs.client.enqueue(
            name, args, task_id=task_id, defer=defer, project=self.project))

    async def run(self, name: str, args: dict[str, Any]) -> TaskRecord:
        client = self._jobs.client
        task = await self.enqueue(name, args)
        try:
            return await client.wait(task.task_id, timeout=self._jobs.wait)
        except TransientError as exc:
            if exc.code != "wait_timeout":
                raise
            raise JobPending(await client.get(task.task_id), self._jobs.wait) from None


def call_jobs(jobs: object) -> CallJobs:
    """A call's job runner as the engine's (``call.jobs``), for the task endpoints."""
    if not isinstance(jobs, CallJobs):
        raise TypeError("the task endpoints need the API's own job runner")
    return jobs


def task_error(task: TaskRecord) -> DewError:
    """The error a failed task ended with, as an engine error of its class (rebuilt
    from the stored code and category, for the API's status mapping)."""
    return DewError.from_dict(
        {"message": f"task {task.task_id} failed", **dict(task.error or {})})


def task_result(task: TaskRecord) -> Any:
    """The result of a task that succeeded; its error, raised, for one that failed."""
    if task.status == "succeeded":
        return task.result
    if task.status == "failed":
        raise task_error(task)
    raise JobPending(task, 0)
