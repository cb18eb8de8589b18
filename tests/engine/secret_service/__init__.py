"""A test-only service: a job with secret fields under names no list would guess."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec("testsecret", jobs="tests.engine.secret_service.jobs")
