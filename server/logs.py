"""Server logging: text or JSON lines, each request-level line tagged with its request id, and the access log.

The request id lives in a context variable that the front ends set at the start of each
request (the client's id when it gave one, else a generated one that the answer carries
back), so every line logged while serving that request carries it without each call site
passing it along. Lines never quote tensor contents or prompt text: the access log names
the model and the outcome only.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import sys
import time
from typing import Any

# The id of the request being served in this task ("" outside requests).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
ACCESS_LOGGER = "ortserve.access"
# Audit lines (admin actions, refused credentials): this logger keeps level info whatever --log-level says.
AUDIT_LOGGER = "ortserve.audit"
# Request ids the server makes up: a random prefix per process and a counter, cheaper than
# a UUID per request and unique across workers and restarts.
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)
# The most characters of a client-given id kept (it is echoed and logged).
MAX_REQUEST_ID_CHARS = 128


def new_request_id(given: str = "") -> str:
    """The client's id (cut to a sane length, without control characters), or a new one."""
    if given:
        cleaned = "".join(c for c in given[:MAX_REQUEST_ID_CHARS] if c.isprintable())
        if cleaned:
            return cleaned
    return f"{_PREFIX}-{next(_COUNTER)}"


def adopt_request_id(given: str) -> None:
    """Makes the client's id (from the request body) the current request's id, if it gave one."""
    if given:
        request_id.set(new_request_id(given))


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        if rid:
            first, newline, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{first} [request_id={rid}]{newline}{rest}"
        return line


# LogRecord attributes that are not `extra=` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str) -> None:
    """Sets up the root logger: `text` or `json` lines on stderr, tagged with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Records of a logger with its own level reach the root's handler whatever the root's level.
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)


def access(protocol: str, method: str, model: str, status: str, started: float) -> None:
    """One access-log line (--log-requests): protocol, method or route, model, status, duration, request id."""
    duration_ms = (time.perf_counter() - started) * 1000
    logging.getLogger(ACCESS_LOGGER).info(
        "%s %s model=%s status=%s duration_ms=%.3f", protocol, method, model or "-", status, duration_ms,
        extra={"protocol": protocol, "method": method, "model": model, "status": status,
               "duration_ms": round(duration_ms, 3)},
    )


def audit(event: str, principal: str, **fields: str) -> None:
    """One audit line (always written, whatever --log-level): an admin action or a refused credential.

    `principal` is the caller's configured name (or "-" when unknown); secrets never appear here.
    """
    # Values can carry client text (a path, a model name): control characters are escaped so that a client
    # cannot start a forged line in a text log.
    fields = {key: _printable(value) for key, value in fields.items()}
    principal = _printable(principal)
    details = " ".join(f"{key}={value}" for key, value in fields.items() if value)
    logging.getLogger(AUDIT_LOGGER).info(
        "audit %s principal=%s %s", event, principal, details,
        extra={"audit_event": event, "principal": principal, **fields},
    )


def _printable(value: str) -> str:
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
