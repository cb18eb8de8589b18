"""A test-only service: a job that fails until its cause is fixed (a file exists)."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec("retrytest", jobs="tests.engine.retry_service.jobs")
