"""The security settings both services and their clients share, and their flags.

`ServerSecurity` is what a server is given (`--tls-cert/--tls-key`, `--tls-client-ca` for
mutual TLS, `--tls-allowed-clients`, `--auth-tokens`); `ClientSecurity` what a client is
given to call one (`<prefix>-tls-ca`, `<prefix>-tls-cert/-key`, `<prefix>-token-file`).
Secrets are passed as files, never on the command line, where `ps` would show them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import grpc

from kvevict.auth import AuthInterceptor, Authenticator, load_tokens, read_token, token_metadata
from kvevict.tls import ClientTls, ServerTls


@dataclass(frozen=True)
class ServerSecurity:
    """A server's TLS files and who may call it (nothing set: plaintext, anonymous callers)."""

    tls: ServerTls | None = None
    auth_tokens: str | None = None  # path of a tokens file (kvevict.auth.load_tokens)
    allowed_clients: tuple[str, ...] = ()  # client certificate common names (mutual TLS)
    _authenticator: Authenticator | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Read everything now: a bad file is an error at start, not at the first call.
        tokens = load_tokens(self.auth_tokens) if self.auth_tokens else None
        authenticator = Authenticator(tokens, mutual_tls=self.tls is not None and self.tls.mutual,
                                      allowed_clients=self.allowed_clients)
        if self.tls is not None:
            self.tls.credentials()
        object.__setattr__(self, "_authenticator", authenticator)

    @property
    def authenticator(self) -> Authenticator:
        assert self._authenticator is not None
        return self._authenticator

    def credentials(self) -> grpc.ServerCredentials | None:
        return None if self.tls is None else self.tls.credentials()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AuthInterceptor(self.authenticator)] if self.authenticator.enabled else []

    def describe(self) -> str:
        """For the ready log line: `plaintext`, `tls`, `mtls`, plus `+tokens`."""
        transport = "plaintext" if self.tls is None else ("mtls" if self.tls.mutual else "tls")
        return transport + ("+tokens" if self.auth_tokens else "")


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a secured server: TLS files and its token (None: plaintext, none)."""

    tls: ClientTls | None = None
    token: str | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return None if self.tls is None else self.tls.credentials()

    def channel(self, address: str, options: list[tuple[str, int]]) -> grpc.Channel:
        """A channel to `address`: TLS when configured, else plaintext."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata presenting the token (empty without one)."""
        return token_metadata(self.token)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def add_server_security_flags(parser: argparse.ArgumentParser, env_prefix: str) -> None:
    """--tls-cert, --tls-key, --tls-client-ca, --tls-allowed-clients, --auth-tokens (each with
    the environment variable `<env_prefix>_TLS_CERT`, ...)."""
    group = parser.add_argument_group("security (see the README's threat model)")
    for flag, help in (("tls-cert", "PEM certificate to serve TLS with (with --tls-key)"),
                       ("tls-key", "PEM private key of --tls-cert"),
                       ("tls-client-ca", "PEM CA whose client certificates are required (mutual TLS); the "
                                         "certificate's common name is the caller's identity without tokens"),
                       ("tls-allowed-clients", "comma-separated client certificate common names allowed; "
                                               "others: PERMISSION_DENIED (needs --tls-client-ca)"),
                       ("auth-tokens", "file of `<client-name> <token>` lines: every call needs `authorization: "
                                       "Bearer <token>`, and sessions belong to the client that opened them")):
        variable = f"{env_prefix}_{flag.replace('-', '_').upper()}"
        group.add_argument(f"--{flag}", dest=flag.replace("-", "_"), default=_env(variable),
                           help=f"{help} [{variable}, default none]")


def server_security(args: argparse.Namespace) -> ServerSecurity:
    allowed = tuple(name.strip() for name in (args.tls_allowed_clients or "").split(",") if name.strip())
    return ServerSecurity(tls=ServerTls.from_options(args.tls_cert, args.tls_key, args.tls_client_ca),
                          auth_tokens=args.auth_tokens, allowed_clients=allowed)


def add_client_security_flags(parser: argparse.ArgumentParser, prefix: str, env_prefix: str, what: str) -> None:
    """`--<prefix>tls-ca`, `--<prefix>tls-cert`, `--<prefix>tls-key`, `--<prefix>token-file` for
    calling `what` (prefix "" or e.g. "manager-")."""
    for flag, help in (("tls-ca", f"PEM CA that signed {what}'s certificate: call it over TLS"),
                       ("tls-cert", f"PEM client certificate for {what}'s mutual TLS (with the key)"),
                       ("tls-key", "PEM private key of the client certificate"),
                       ("token-file", f"file holding the token to call {what} with")):
        variable = f"{env_prefix}_{flag.replace('-', '_').upper()}"
        parser.add_argument(f"--{prefix}{flag}", dest=f"{prefix}{flag}".replace("-", "_"), default=_env(variable),
                            help=f"{help} [{variable}, default none]")


def client_security(args: argparse.Namespace, prefix: str) -> ClientSecurity:
    """The ClientSecurity of add_client_security_flags' flags; ValueError names a bad one."""
    dest = prefix.replace("-", "_")
    tls = ClientTls.from_options(getattr(args, f"{dest}tls_ca"), getattr(args, f"{dest}tls_cert"),
                                 getattr(args, f"{dest}tls_key"), flag_prefix=f"--{prefix}tls")
    token_file = getattr(args, f"{dest}token_file")
    token = read_token(token_file, f"--{prefix}token-file") if token_file else None
    if tls is not None:
        tls.credentials()  # a missing file fails now
    return ClientSecurity(tls=tls, token=token)
