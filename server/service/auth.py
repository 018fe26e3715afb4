"""Authentication: who a request's bearer credential says it is (--auth-config).

An API key is hashed (SHA-256) and compared against every configured digest in constant time
(hmac.compare_digest over all entries, no early exit), so neither the key nor which entry it
is near leaks through timing. A JWT access token is verified offline with PyJWT against the
JWKS file: signature with an algorithm from the configured asymmetric list, a known `kid`, `exp`
and `nbf` with the configured leeway, `iss` and `aud`. Verified tokens are remembered until they
expire (a bounded cache), so a client that reuses its token pays for the signature check once.

Front ends call `Authenticator.admit` once per call or request; the principal it returns goes
into `access.current_principal` for the data plane's per-model checks.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from server.core.errors import PermissionDeniedError, UnauthenticatedError
from server.logs import audit
from server.service.access import Principal, RequestRates
from server.service.auth_config import ROLES, AuthConfig, AuthConfigError, JwtConfig, load_auth_config

logger = logging.getLogger(__name__)

# Verified JWTs remembered at once; the oldest is forgotten first.
TOKEN_CACHE_SIZE = 4096
MAX_TOKEN_CHARS = 16384
MAX_JWKS_BYTES = 1 << 20


def hash_key(key: str) -> str:
    """The digest an auth config stores for an API key (what `ortserve hash-key` prints)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Keys:
    """One loaded config: principals by digest, the JWKS, and what is open."""

    config: AuthConfig
    digests: tuple[tuple[bytes, Principal], ...]
    jwks: dict[str, Any]  # kid -> PyJWK
    only_key: Any  # the JWKS's one key when it holds exactly one (tokens without `kid` use it)
    # API keys already matched under this config -> their principal. Only valid keys go in, so it holds at
    # most one entry per configured key; it goes with the config, so a reload (a revoked key) empties it.
    verified: dict[str, Principal] = field(default_factory=dict)


def _load(path: Path) -> _Keys:
    config = load_auth_config(path)
    digests = tuple(
        (bytes.fromhex(entry.key_sha256),
         Principal(entry.name, frozenset(entry.roles), tuple(entry.models), entry.rate_limit, "api-key"))
        for entry in config.api_keys
    )
    jwks: dict[str, Any] = {}
    only_key = None
    if config.jwt is not None:
        jwks, only_key = _read_jwks(config.jwt.jwks_file, path)
    return _Keys(config, digests, jwks, only_key)


def _read_jwks(jwks_file: Path, config_path: Path) -> tuple[dict[str, Any], Any]:
    where = f"auth config {config_path}: jwt.jwks_file {jwks_file}"
    try:
        with jwks_file.open("rb") as handle:
            raw = handle.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise AuthConfigError(f"{where}: over {MAX_JWKS_BYTES} bytes")
        key_set = jwt.PyJWKSet.from_dict(json.loads(raw))
    except OSError as exc:
        raise AuthConfigError(f"{where}: {exc.strerror or exc}") from exc
    except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
        raise AuthConfigError(f"{where}: not a usable JWKS: {exc}") from exc
    keys = {k.key_id: k for k in key_set.keys if k.key_id}
    return keys, (key_set.keys[0] if len(key_set.keys) == 1 else None)


def _bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _text(peer: str | Callable[[], str]) -> str:
    return peer if isinstance(peer, str) else peer()


class Authenticator:
    """Checks credentials against the auth config; `reload` swaps in a new config (SIGHUP).

    Args:
        path: The auth config file (validated now: a bad file stops the start).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys = _load(path)
        self._tokens: collections.OrderedDict[str, tuple[Principal, float]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.rates = RequestRates()

    @property
    def config(self) -> AuthConfig:
        return self._keys.config

    def reload(self) -> bool:
        """Re-reads the config and the JWKS; on an error keeps the current ones (logged). True when swapped."""
        try:
            keys = _load(self.path)
        except AuthConfigError as exc:
            logger.error("auth config not reloaded, the previous one stays in force: %s", exc)
            return False
        with self._lock:
            self._keys = keys
            self._tokens.clear()  # a removed key or a rotated JWKS must stop working now
        self.rates.forget()
        logger.info("auth config reloaded from %s (%d API keys, JWT %s)", self.path, len(keys.digests),
                    "on" if keys.config.jwt is not None else "off")
        return True

    def admit(
        self, authorization: str | None, role: str, where: str, peer: str | Callable[[], str] = ""
    ) -> Principal:
        """The principal of a call that needs `role`, rate-limited; refusals are audited.

        `peer` (the caller's address, for the audit line) may be a function, called only for a refusal:
        finding it costs the gRPC front end a call into the C core on every request otherwise.

        Raises:
            UnauthenticatedError: no bearer credential, or one that is not valid.
            PermissionDeniedError: valid, but the principal lacks the role.
            RateLimitedError: over the principal's request rate.
        """
        token = _bearer(authorization)
        if token is None:
            reason = "no credentials" if not authorization else "not a bearer credential"
            audit("authentication_refused", "-", where=where, reason=reason, peer=_text(peer))
            raise UnauthenticatedError(f"{reason}: send 'authorization: Bearer <API key or access token>'")
        try:
            principal = self.authenticate(token)
        except UnauthenticatedError as exc:
            audit("authentication_refused", "-", where=where, reason=str(exc), peer=_text(peer))
            raise
        if role not in principal.roles:
            audit("permission_refused", principal.name, where=where, reason=f"lacks role {role}", peer=_text(peer))
            raise PermissionDeniedError(f"principal '{principal.name}' does not have the '{role}' role")
        self.rates.admit(principal)
        return principal

    def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for.

        Raises:
            UnauthenticatedError: an unknown API key, or a JWT that fails verification (the
                message says which check, never the token).
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise UnauthenticatedError("credential is too long")
        keys = self._keys
        if token.count(".") == 2 and keys.config.jwt is not None:
            return self._token_principal(token, keys, keys.config.jwt)
        # A key seen before skips SHA-256 (OpenSSL's: about half of auth's time per call in a profile of the
        # server at c=64, far more than in a quiet loop). The lookup is no timing oracle: str hashing is
        # keyed per process (SipHash), and only keys that already matched are in the dict.
        known = keys.verified.get(token)
        if known is not None:
            return known
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for stored, principal in keys.digests:  # every entry, always: constant time
            if hmac.compare_digest(digest, stored):
                found = principal
        if found is None:
            raise UnauthenticatedError("invalid API key")
        keys.verified[token] = found
        return found

    def _token_principal(self, token: str, keys: _Keys, config: JwtConfig) -> Principal:
        now = time.time()
        with self._lock:
            cached = self._tokens.get(token)
            if cached is not None and now < cached[1] + config.leeway_s:
                self._tokens.move_to_end(token)
                return cached[0]
        claims = self._verify(token, keys, config)
        principal = _principal_from_claims(claims, config)
        with self._lock:
            if self._keys is keys:  # not across a reload
                self._tokens[token] = (principal, float(claims["exp"]))
                while len(self._tokens) > TOKEN_CACHE_SIZE:
                    self._tokens.popitem(last=False)
        return principal

    def _verify(self, token: str, keys: _Keys, config: JwtConfig) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise UnauthenticatedError("malformed access token") from exc
        algorithm = header.get("alg")
        if algorithm not in config.algorithms:
            raise UnauthenticatedError(f"access token algorithm {str(algorithm)[:16]!r} is not accepted")
        kid = header.get("kid")
        key = keys.jwks.get(kid) if isinstance(kid, str) else (keys.only_key if kid is None else None)
        if key is None:
            raise UnauthenticatedError("access token signed with an unknown key (kid)")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=config.audience, issuer=config.issuer,
                leeway=config.leeway_s, options={"require": ["exp", "iss", "aud", config.name_claim]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise UnauthenticatedError("access token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise UnauthenticatedError("access token is not valid yet (nbf)") from exc
        except jwt.InvalidAudienceError as exc:
            raise UnauthenticatedError("access token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise UnauthenticatedError("access token is from another issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise UnauthenticatedError(f"access token lacks the '{exc.claim}' claim") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise UnauthenticatedError("access token signature or claims are not valid") from exc
        return claims


def _claim_values(value: object) -> list[str]:
    """A claim as a list of strings: a space-separated string (OAuth2 `scope`) or a list of strings."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _principal_from_claims(claims: dict[str, Any], config: JwtConfig) -> Principal:
    values = _claim_values(claims.get(config.roles_claim))
    roles: frozenset[str]
    if config.role_map:
        roles = frozenset(config.role_map[v] for v in values if v in config.role_map)
    else:
        roles = frozenset(v for v in values if v in ROLES)
    models = tuple(config.models)
    if config.models_claim is not None:
        models = tuple(_claim_values(claims.get(config.models_claim)))
    name = str(claims[config.name_claim])[:128]
    return Principal(name, roles, models, config.rate_limit, "jwt")
