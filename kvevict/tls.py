"""TLS and mutual TLS for both services and their clients, from PEM files given by path.

Server side (`ServerTls`): a certificate and key; with `client_ca`, clients must present a
certificate signed by that CA (mutual TLS), and the certificate's subject common name becomes
the caller's identity (kvevict.auth). Client side (`ClientTls`): the CA that signed the server's
certificate (None: the system's roots) and, for mutual TLS, the client's own certificate and
key. Files are read once, at start; a missing or unreadable file is a ValueError naming the
option, before anything listens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{option}: cannot read {path!r}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{option}: {path!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's TLS files; `client_ca` set = mutual TLS (client certificates required)."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, client_ca: str | None,
                     flag_prefix: str = "--tls") -> ServerTls | None:
        """None when no TLS option is given; ValueError when only some of the needed ones are."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise ValueError(f"{flag_prefix}-cert and {flag_prefix}-key go together (and {flag_prefix}-client-ca "
                             f"needs both)")
        return cls(cert, key, client_ca or None)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (_read(self.key, "tls key"), _read(self.cert, "tls cert"))
        root = _read(self.client_ca, "tls client CA") if self.client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


@dataclass(frozen=True)
class ClientTls:
    """What a client needs to call a TLS server: the server's CA (None: system roots) and, for
    mutual TLS, its own certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_options(cls, ca: str | None, cert: str | None, key: str | None,
                     flag_prefix: str = "--tls") -> ClientTls | None:
        """None when no option is given (plaintext); ValueError when a certificate lacks its key."""
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise ValueError(f"{flag_prefix}-cert and {flag_prefix}-key go together")
        return cls(ca or None, cert or None, key or None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "tls CA") if self.ca else None,
            private_key=_read(self.key, "tls key") if self.key else None,
            certificate_chain=_read(self.cert, "tls cert") if self.cert else None,
        )
