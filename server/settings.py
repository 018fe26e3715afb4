"""Server settings: command-line flags, with SERVER_* environment variables as defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything `ortserve serve` can be told."""

    model_config = SettingsConfigDict(env_prefix="SERVER_", frozen=True)

    model_repository: Path = Path("model_repository")
    """Directory holding one folder per model."""
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
    0 picks 2 on machines with 2 or more cores (measured best on 2 cores, see docs/benchmarks.md), else 1."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """auto: uvloop when it is installed, else asyncio's own loop."""
    worker_index: int | None = None
    """Set by the supervisor in a worker process; not a user setting."""
    peer_dir: Path | None = None
    """Set by the supervisor: where workers publish their private sockets."""

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
        """The worker count, with 0 (auto) resolved for this machine."""
        if self.workers:
            return self.workers
        return 2 if (os.cpu_count() or 1) >= 2 else 1

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_send_message_bytes > (1 << 31) - 1 or self.max_receive_message_bytes > (1 << 31) - 1:
            raise ValueError("message size limits must be below 2 GiB (gRPC's limit)")
        return self
