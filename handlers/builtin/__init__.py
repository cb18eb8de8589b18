"""The built-in service: ``engine.*`` jobs (echo, sleep, flaky, fail) for checks, tests
and the demo, and the engine over HTTPS (tasks, failure records, retries: ``api``)."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec("builtin", title="built-in engine.* jobs and the engine's API",
                      jobs="handlers.builtin.jobs", api="handlers.builtin.api",
                      roles="handlers.builtin.roles:CATALOG")
