"""The auth config file (--auth-config): who may call, with which roles, on which models, how often.

    api_keys:
      - name: team-a                    # the principal's name in logs and audit lines
        key_sha256: 9f86d081...         # `ortserve hash-key` prints it; the key itself is never stored
        roles: [infer]                  # infer, admin, metrics
        models: ["digits*", "bytes_decoder"]   # glob patterns; default ["*"]
        rate_limit: {requests_per_second: 50, burst: 100, max_streams: 4}
    jwt:                                # OAuth2 / OIDC access tokens, verified offline
      jwks_file: /etc/ortserve/jwks.json
      issuer: https://login.example.com/
      audience: ortserve
      algorithms: [RS256, ES256]
      roles_claim: scope                # a space-separated string or a list of strings
      role_map: {"ortserve.infer": infer}   # claim value -> role; default: values named like the roles
      models: ["*"]                     # or models_claim: a claim listing the patterns
    open:                               # what needs no credentials
      health: true                      # gRPC health, ServerLive/ServerReady, HTTP /v2/health/*
      reflection: false
      metrics: false

YAML is parsed by PyYAML (safe_load) and validated by pydantic with unknown keys refused, so a
typo is an error at start (naming the entry, e.g. `api_keys[1].roles[0]`), never a silently open server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Role = Literal["infer", "admin", "metrics"]
ROLES: tuple[Role, ...] = ("infer", "admin", "metrics")
# Asymmetric algorithms only: a shared-secret (HS*) token could be forged by anyone who has the
# public JWKS, if a verifier ever accepted it (algorithm confusion); `none` is never accepted.
JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_CONFIG_BYTES = 4 << 20


class AuthConfigError(Exception):
    """The auth config cannot be used; the message names the file and the offending entry."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """Per principal, per server process: requests per second with a burst, and concurrent generations."""

    requests_per_second: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_streams: int | None = Field(None, ge=1)

    def bucket_size(self) -> float:
        """The burst, or one second's worth of requests (at least one) when not given."""
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, float(self.requests_per_second or 1.0))


class ApiKeyEntry(_Strict):
    name: str = Field(min_length=1, max_length=128)
    key_sha256: str
    roles: list[Role] = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    rate_limit: RateLimit | None = None

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _HEX_DIGEST.match(value):
            raise ValueError("must be a SHA-256 digest: 64 hexadecimal digits (`ortserve hash-key` prints one)")
        return value


def _default_algorithms() -> list[JwtAlgorithm]:
    return ["RS256", "ES256"]


class JwtConfig(_Strict):
    jwks_file: Path
    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    algorithms: list[JwtAlgorithm] = Field(default_factory=_default_algorithms, min_length=1)
    leeway_s: float = Field(30.0, ge=0, le=600)
    name_claim: str = "sub"
    roles_claim: str = "scope"
    role_map: dict[str, Role] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    models_claim: str | None = None
    rate_limit: RateLimit | None = None


class OpenAccess(_Strict):
    health: bool = True
    reflection: bool = False
    metrics: bool = False


class AuthConfig(_Strict):
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    jwt: JwtConfig | None = None
    open: OpenAccess = Field(default_factory=OpenAccess)

    @model_validator(mode="after")
    def _one_way_in(self) -> AuthConfig:
        if not self.api_keys and self.jwt is None:
            raise ValueError("give api_keys, jwt, or both: with neither, nobody could call")
        names: dict[str, int] = {}
        digests: dict[str, int] = {}
        for index, entry in enumerate(self.api_keys):
            if entry.name in names:
                raise ValueError(f"api_keys[{index}]: name {entry.name!r} is also api_keys[{names[entry.name]}]'s")
            if entry.key_sha256 in digests:
                raise ValueError(f"api_keys[{index}]: the same key as api_keys[{digests[entry.key_sha256]}]")
            names[entry.name] = index
            digests[entry.key_sha256] = index
        return self


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def load_auth_config(path: Path) -> AuthConfig:
    """Reads and validates the auth config file.

    Raises:
        AuthConfigError: unreadable, not YAML, or not valid; the message lists each offending entry.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AuthConfigError(f"auth config {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise AuthConfigError(f"auth config {path}: over {MAX_CONFIG_BYTES} bytes")
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"auth config {path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise AuthConfigError(f"auth config {path}: expected a mapping with api_keys and/or jwt")
    try:
        return AuthConfig.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise AuthConfigError(f"auth config {path}: {problems}") from exc
