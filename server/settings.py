"""Server settings: the one list of what `ortserve serve` can be told.

The command line (`add_arguments`), the SERVER_* environment variables (pydantic-settings)
and the command line of each worker process (`worker_arguments`) are all derived from the
fields below, their types and their docstrings; a new setting is one field here.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.runtime.cpus import usable_cpus


class Settings(BaseSettings):
    """Everything `ortserve serve` can be told."""

    model_config = SettingsConfigDict(env_prefix="SERVER_", frozen=True, use_attribute_docstrings=True)

    model_repository: Path = Path("model_repository")
    """Directory holding one folder per model; or one model: an ONNX file, or a folder holding one (a
    model directory as in a repository, or just its files), served alone (see model_name)."""
    model_name: str | None = None
    """The name of a model served alone (model_repository is a file or a model folder); default: the file's
    or folder's name."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = Field(8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one (see port_file)."""
    port_file: Path | None = None
    """If set, the bound gRPC port is written here once the server is ready (for tests and scripts);
    the HTTP port goes to the same path with `.http` appended (see http_port_file)."""
    allow_http: bool = True
    """Serve HTTP (KServe v2 REST, Triton's generate extension, OpenAI routes) beside gRPC."""
    http_port: int = Field(8000, ge=0, le=65535)
    """HTTP port (Triton's default 8000); 0 picks a free one."""
    http_max_body_bytes: int | None = Field(None, ge=1)
    """Largest HTTP request body; larger ones get 413 unread. Default: max_receive_message_bytes."""
    allow_metrics: bool = True
    """Serve Prometheus metrics at /metrics on metrics_port (and on the HTTP port)."""
    metrics_port: int = Field(8002, ge=0, le=65535)
    """Metrics port (Triton's default 8002); 0 picks a free one (written to the port file's path + `.metrics`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when this ONNX Runtime build and machine have it, else CPU."""
    max_receive_message_bytes: int = Field(1 << 30, ge=4 << 20)
    """Largest request accepted (gRPC's own default is 4 MiB)."""
    max_send_message_bytes: int = Field(1 << 30, ge=4 << 20)
    """Largest response sent."""
    grpc_max_connection_age_s: float | None = Field(None, gt=0)
    """Close each gRPC connection after this many seconds (clients reconnect, gracefully: calls in flight get
    the shutdown grace to finish), so long-lived channels rebalance onto new replicas behind a load balancer.
    Default: never."""
    default_max_batch_size: int = Field(64, ge=1)
    """max_batch_size of models whose config leaves it out and whose graph batches."""
    strict_readiness: bool = True
    """ServerReady is true only while every model is ready (Triton's default)."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """How long in-flight requests may take to finish after SIGTERM or Ctrl-C."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server log level; only debug logs tensor contents or prompt text."""
    log_format: Literal["text", "json"] = "text"
    """text: one readable line per record; json: one JSON object per line (for log collectors)."""
    log_requests: bool = False
    """Write an access log line per request (protocol, method, model, status, duration, request id)."""
    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    """none: load every model at start; poll: also watch the repository; explicit: load through the API."""
    repository_poll_secs: float = Field(15.0, gt=0)
    """Seconds between repository scans in poll mode."""
    load_model: list[str] = Field(default_factory=list)
    """Models to load at start in explicit mode ("*" for all)."""
    workers: int = Field(0, ge=0, le=64)
    """Server processes sharing the port (SO_REUSEPORT), each with its own models and batchers;
    0 picks 2 where this process may use 2 or more CPUs (affinity mask and cgroup quota; measured best on 2
    cores, see docs/benchmarks.md), else 1."""
    cpu_affinity: Literal["auto", "none"] = "auto"
    """auto: with 2 or more workers, each worker's threads are pinned to its own share of the CPUs this process
    may use, so a request's hand-offs between the event loop, grpc.aio's poller and the model stay on one CPU
    (gRPC's own threads and text-generation models still use every CPU); not under a cgroup CPU quota smaller
    than the affinity mask. none: the kernel places every thread."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """auto: uvloop when it is installed, else asyncio's own loop."""
    tls_cert: Path | None = None
    """TLS on the gRPC, HTTP and metrics ports: the server certificate (PEM, then any intermediates), re-read
    when it changes on disk (new connections get the new one). Needs tls_key."""
    tls_key: Path | None = None
    """The TLS certificate's private key (PEM, unencrypted), re-read with the certificate."""
    tls_client_ca: Path | None = None
    """Mutual TLS: clients must present a certificate issued by a CA in this PEM file (read at start)."""
    auth_config: Path | None = None
    """Authentication and authorisation (YAML): API keys (SHA-256 digests; `ortserve hash-key`), OAuth2/OIDC
    JWTs checked against a JWKS file, roles (infer, admin, metrics), model patterns and rate limits per
    principal. Re-read on SIGHUP. Default: no auth (anyone who reaches a port may call it)."""
    worker_index: int | None = None
    """Set by the supervisor in a worker process; not a user setting."""
    peer_dir: Path | None = None
    """Set by the supervisor: where workers publish their private sockets; not a user setting."""

    def http_port_file(self) -> Path | None:
        """Where the bound HTTP port is written: the port file's path with `.http` appended.

        A file of its own keeps the port file a single number for every existing reader.
        """
        return None if self.port_file is None else self.port_file.with_name(self.port_file.name + ".http")

    def metrics_port_file(self) -> Path | None:
        """Where the bound metrics port is written: the port file's path with `.metrics` appended."""
        return None if self.port_file is None else self.port_file.with_name(self.port_file.name + ".metrics")

    def resolved_http_max_body_bytes(self) -> int:
        """The HTTP body limit, defaulting to the gRPC receive limit."""
        return self.http_max_body_bytes if self.http_max_body_bytes is not None else self.max_receive_message_bytes

    def resolved_workers(self) -> int:
        """The worker count, with 0 (auto) resolved for the CPUs this process may use (affinity, cgroup quota)."""
        if self.workers:
            return self.workers
        return 2 if usable_cpus() >= 2 else 1

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_send_message_bytes > (1 << 31) - 1 or self.max_receive_message_bytes > (1 << 31) - 1:
            raise ValueError("message size limits must be below 2 GiB (gRPC's limit)")
        self._check_tls()
        return self

    def _check_tls(self) -> None:
        """TLS files come as a pair (plus an optional client CA) and must be readable: said at start, clearly."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
                raise ValueError(f"{name}: {path} is not a readable file")


# Set by the supervisor for its workers, hidden from --help.
_INTERNAL = ("worker_index", "peer_dir")
# Flags whose value the supervisor decides for each worker (ports it reserved, its own files).
_PER_WORKER = ("port", "http_port", "metrics_port", "port_file", "worker_index", "peer_dir", "model_name")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """`int` for `int | None`; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _true_false(value: str) -> bool:
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value == "true"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (`--http-port` for http_port), typed and described from the field.

    Flags left out keep their default (or their SERVER_* environment variable): parsed
    values are None unless given, so only what was typed overrides.
    """
    for name, field in Settings.model_fields.items():
        base = _base_type(field.annotation)
        help_text = argparse.SUPPRESS if name in _INTERNAL else " ".join((field.description or "").split())
        default = field.get_default(call_default_factory=True)
        if help_text is not argparse.SUPPRESS and default not in (None, [], ""):
            shown = str(default).lower() if isinstance(default, bool) else default
            help_text += f" (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text, "default": None}
        if base is bool:
            kwargs.update(type=_true_false, choices=[True, False], metavar="{true,false}")
        elif typing.get_origin(base) is Literal:
            kwargs.update(choices=list(typing.get_args(base)))
        elif typing.get_origin(base) is list:
            kwargs.update(action="append", metavar="VALUE")
        else:
            kwargs.update(type=base)
        parser.add_argument(_flag(name), **kwargs)


def given_arguments(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings a parsed command line gave (flags left out are not in it)."""
    fields = Settings.model_fields
    return {name: value for name, value in vars(namespace).items() if name in fields and value is not None}


def worker_arguments(settings: Settings, **per_worker: Any) -> list[str]:
    """The `serve` flags that give a worker process the same settings, plus its own (`per_worker`).

    Every setting is passed explicitly (resolved values, not the environment), so a worker
    behaves the same whatever its environment holds.
    """
    values = {n: getattr(settings, n) for n in Settings.model_fields if n not in _PER_WORKER}
    values["http_max_body_bytes"] = settings.resolved_http_max_body_bytes()
    values.update(per_worker)
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            args += [_flag(name), "true" if value else "false"]
        elif isinstance(value, list):
            for item in value:
                args += [_flag(name), str(item)]
        else:
            args += [_flag(name), str(value)]
    return args
