"""Secrets never reach task rows or log lines in clear."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import structlog

from engine.logs import configure_logging
from engine.redaction import REDACTED, contains_redacted, keep_sealed, redact
from engine.serialization import NotJson, dumps, loads

ARGS = {
    "keypair": "kp1",
    "auth": {"password": "hunter2", "private_key": "-----BEGIN"},
    "servers": [{"host": "h", "api_key": "k"}],
    "db_pin": "1234",
    "note": None,
}


def test_redact_walks_nested_values() -> None:
    out = redact(ARGS)
    assert out["keypair"] == "kp1"
    assert out["auth"] == {"password": REDACTED, "private_key": REDACTED}
    assert out["servers"][0] == {"host": "h", "api_key": REDACTED}
    assert out["db_pin"] == REDACTED
    assert "hunter2" not in json.dumps(out)


def test_job_declared_secret_fields() -> None:
    assert redact({"value": "s3"}, extra={"value"}) == {"value": REDACTED}


def test_store_form_keeps_sealed_values_and_drops_clear_ones() -> None:
    sealed = {"$sealed": "Y2lwaGVy"}
    stored = keep_sealed({"password": sealed, "other_password": "clear"})
    assert stored == {"password": sealed, "other_password": REDACTED}
    assert contains_redacted(stored)
    assert not contains_redacted({"password": sealed})
    assert redact({"password": sealed}) == {"password": REDACTED}


def test_log_lines_are_redacted(tmp_path: Path) -> None:
    log_file = tmp_path / "dew.log"
    configure_logging(log_file, "debug", console="off")
    structlog.get_logger("t").info("binding", auth={"password": "hunter2"}, token="abc")
    logging.getLogger("foreign").warning("plain stdlib line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text()
    assert "hunter2" not in text and '"abc"' not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["auth"] == {"password": REDACTED}
    assert lines[1]["event"] == "plain stdlib line"


def test_json_wire_format_refuses_pickle() -> None:
    import pickle

    assert loads(dumps({"a": [1, 2]})) == {"a": [1, 2]}
    for payload in (pickle.dumps({"f": "engine.echo"}), b"not json"):
        try:
            loads(payload)
        except NotJson:
            continue
        raise AssertionError("payload accepted")
