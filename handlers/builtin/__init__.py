"""Built-in ``engine.*`` jobs (echo, sleep, flaky, fail) for checks, tests and the demo."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec("builtin", title="built-in engine.* jobs", jobs="handlers.builtin.jobs")
