"""A test-only service: a long job with safe points, for ``dew tasks cancel`` of a
running task (tests/engine/test_cancel_running.py)."""

from engine.services import ServiceSpec

SERVICE = ServiceSpec("canceltest", jobs="tests.engine.cancel_service.jobs")
