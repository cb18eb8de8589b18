"""A test-only service with API operations: echo, a crash, a job, a KMS-shaped path."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec(
    "apiecho",
    api="tests.engine.api_echo_service.api",
    jobs="tests.engine.api_echo_service.jobs",
    roles="tests.engine.api_echo_service.api:ROLES",
)
