"""TLS for the public ports: gRPC server credentials and an `ssl.SSLContext` for uvicorn, both reloading.

The certificate chain and key are re-read when either file changes on disk (its mtime, size or
inode: a rename of a freshly written file counts), without a restart and without touching open
connections: only handshakes that start afterwards see the new certificate.

- gRPC: `grpc.dynamic_ssl_server_credentials` asks our fetcher at each new handshake; the fetcher
  answers a new configuration when the files changed, else None (keep the current one).
- HTTP and metrics: one `ssl.SSLContext` that uvicorn hands to asyncio; `reload()` calls
  `load_cert_chain` on that same context, which new connections copy their certificate from.

A pair that fails to load (a half-written file, a key that does not belong to the certificate)
is refused as a whole: the old certificate stays, and an error is logged once the files have
stayed that way for a check interval (see `CertificateFiles.refresh`).
The client CA (mutual TLS) is read once, at start; changing it needs a restart.

A leaf module: the standard library and grpc only (app.py wires it into both front ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

# How often the HTTP side looks at the files (gRPC looks at each new handshake).
WATCH_INTERVAL_S = 1.0

# (mtime_ns, size, inode) of the certificate and of the key file.
Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Pem:
    """One loaded, checked version of the certificate chain and key (PEM bytes)."""

    stamp: Stamp
    chain: bytes
    key: bytes


@dataclass
class _Bad:
    """A version of the files that failed to load."""

    stamp: Stamp
    since: float
    error: str
    logged: bool = False


def _stamp(*paths: Path) -> Stamp:
    stats = [os.stat(p) for p in paths]
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


@contextlib.contextmanager
def _pem_paths(pem: Pem) -> Iterator[tuple[str, str]]:
    """The PEM bytes as two paths that `ssl` can load (it loads from files only).

    Anonymous memory files on Linux (the key never reaches a disk); private temporary files elsewhere.
    """
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create(name) for name in ("ortserve-chain", "ortserve-key")]
        try:
            for fd, data in zip(fds, (pem.chain, pem.key), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="ortserve-tls-") as directory:  # mode 0700
        chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        chain.write_bytes(pem.chain)
        key.write_bytes(pem.key)
        yield str(chain), str(key)


def load_into(context: ssl.SSLContext, pem: Pem) -> None:
    """Puts `pem` into `context` (new handshakes on it present this certificate)."""
    with _pem_paths(pem) as (chain, key):
        context.load_cert_chain(chain, key)


class CertificateFiles:
    """The certificate chain and key files, re-read when they change; thread-safe (gRPC fetches off the loop).

    Args:
        cert: PEM file: the server certificate, then any intermediates.
        key: PEM file: the certificate's private key (unencrypted).
        client_ca: PEM file of the CA(s) that client certificates must chain to (mutual TLS); None: no client
            certificates asked for.

    Raises:
        OSError, ssl.SSLError: at construction, when the files cannot be read or do not make a valid pair.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.client_ca_pem: bytes | None = client_ca.read_bytes() if client_ca is not None else None
        self._lock = threading.Lock()
        self._bad: _Bad | None = None
        pem = self._read()
        if pem is None:
            raise OSError(f"{cert} or {key} changed while being read; try again")
        self._check(pem)
        self.current = pem
        # Bumped on each accepted change; each consumer remembers the version it applied.
        self.version = 0

    def _read(self) -> Pem | None:
        """The files' bytes, or None when they changed while being read (a writer is busy: look again later)."""
        before = _stamp(self.cert, self.key)
        pem = Pem(before, self.cert.read_bytes(), self.key.read_bytes())
        return pem if _stamp(self.cert, self.key) == before else None

    @staticmethod
    def _check(pem: Pem) -> None:
        """Raises unless the chain and key load together (PEM parses, the key matches the certificate)."""
        load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem)

    def refresh(self) -> int:
        """Re-reads the files if they changed since the accepted version; returns the current version.

        A version that fails to load leaves the previous one current; it is logged as an error once it has
        stayed broken for a check interval (replacing the certificate, then the key, passes through a moment
        where they do not match: that is not worth an error).
        """
        with self._lock:
            stamp = stamp_or_none(self.cert, self.key)
            if stamp is None or stamp == self.current.stamp:
                return self.version
            if self._bad is not None and self._bad.stamp == stamp:
                self._report(self._bad)  # known bad: not read again
                return self.version
            try:
                pem = self._read()
                if pem is None:
                    return self.version
                self._check(pem)
            except (OSError, ssl.SSLError) as exc:
                self._bad = _Bad(stamp, time.monotonic(), str(exc))
                return self.version
            self.current = pem
            self.version += 1
            logger.info("TLS certificate reloaded from %s", self.cert)
            return self.version

    def _report(self, bad: _Bad) -> None:
        if not bad.logged and time.monotonic() - bad.since >= WATCH_INTERVAL_S:
            logger.error("TLS certificate reload from %s and %s failed, keeping the current one: %s",
                         self.cert, self.key, bad.error)
            bad.logged = True


def stamp_or_none(*paths: Path) -> Stamp | None:
    """The files' stamp, or None when one is missing (mid-rename)."""
    try:
        return _stamp(*paths)
    except OSError:
        return None


def grpc_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Server credentials whose certificate follows the files (checked at each new handshake)."""
    applied = files.version

    def configuration(pem: Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.chain)], files.client_ca_pem)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal applied
        try:
            version = files.refresh()
        except Exception:  # never let an exception into gRPC's handshake (it would fail the connection)
            logger.exception("TLS certificate check failed")
            return None
        if version == applied:
            return None
        applied = version
        return configuration(files.current)

    return grpc.dynamic_ssl_server_credentials(
        configuration(files.current), fetch, require_client_authentication=files.client_ca_pem is not None,
    )


class ReloadingContext:
    """An `ssl.SSLContext` for the HTTP servers, reloaded in place by `watch()`.

    Args:
        files: The certificate files (shared with the gRPC side).
    """

    def __init__(self, files: CertificateFiles) -> None:
        self.files = files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        load_into(context, files.current)
        if files.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(files.client_ca))
        self.context = context
        self._applied = files.version

    def reload(self) -> bool:
        """Applies a changed certificate to the context; True if it did."""
        version = self.files.refresh()
        if version == self._applied:
            return False
        pem = self.files.current
        try:
            load_into(self.context, pem)
        except (OSError, ssl.SSLError):  # checked already; only a failing memory file could get here
            logger.exception("TLS certificate reload failed on the HTTP side")
            return False
        self._applied = version
        return True

    async def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Looks at the files every `interval_s` until cancelled (two stat calls: cheap enough for the loop)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.reload()
            except Exception:  # a failed check must not end the watching
                logger.exception("TLS certificate check failed")
