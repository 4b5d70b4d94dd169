"""Who is calling: bearer tokens and client certificates, checked before any handler runs.

A server has an `Authenticator`:
- **tokens** (`--auth-tokens FILE`): every call must carry `authorization: Bearer <token>`;
  the file's lines are `<client-name> <token>` (`#` starts a comment). One line is a shared
  token (every holder is one client); one line per client gives each its own identity,
  `token:<client-name>`. Only the tokens' SHA-256 digests are kept in memory.
- **client certificates** (mutual TLS, kvevict.tls): without tokens, the identity is the
  certificate's subject common name, `x509:<CN>`; `allowed_clients` (common names) turns
  every other certificate away with PERMISSION_DENIED.
- neither: every caller is the same anonymous identity "" (anyone who can connect can use a
  session whose id it knows; see the README's threat model).

`AuthInterceptor` answers UNAUTHENTICATED (no or a wrong token, no certificate) and
PERMISSION_DENIED (a certificate not in `allowed_clients`) before the request is even
decoded; the health service stays open so probes need no credentials. Servicers ask
`identity(context)` who the caller is: sessions and conversations belong to that identity.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import grpc

ANONYMOUS = ""
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Long enough that guessing is hopeless; `openssl rand -hex 32` makes a good one.
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class Unauthenticated(Exception):
    """No identity could be established (UNAUTHENTICATED)."""


class PermissionDenied(Exception):
    """An identity this server does not serve (PERMISSION_DENIED)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str) -> dict[str, str]:
    """{client name: token} from a tokens file; ValueError naming file:line for a bad line."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"--auth-tokens: cannot read {path!r}: {error.strerror or error}") from None
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{where}: expected `<client-name> <token>`")
        name, token = parts
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: client name must be 1-64 of A-Z a-z 0-9 . _ @ -")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
        if name in tokens:
            raise ValueError(f"{where}: client {name!r} listed twice")
        if token in seen:
            raise ValueError(f"{where}: the same token is listed for two clients")
        tokens[name] = token
        seen.add(token)
    if not tokens:
        raise ValueError(f"--auth-tokens: {path!r} lists no token")
    return tokens


def read_token(path: str, option: str = "--token-file") -> str:
    """The token in a file of one line (a client's own token)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise ValueError(f"{option}: cannot read {path!r}: {error.strerror or error}") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{option}: {path!r} must hold one token and nothing else")
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` (empty without one)."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


class Authenticator:
    """Establishes the caller's identity from its token or client certificate (module docstring)."""

    def __init__(self, tokens: dict[str, str] | None = None, mutual_tls: bool = False,
                 allowed_clients: Iterable[str] = ()) -> None:
        self._identities = {_digest(token): f"token:{name}" for name, token in (tokens or {}).items()}
        self.mutual_tls = mutual_tls
        self.allowed_clients = frozenset(allowed_clients)
        if self.allowed_clients and not mutual_tls:
            raise ValueError("--tls-allowed-clients needs mutual TLS (--tls-client-ca)")

    @property
    def enabled(self) -> bool:
        return bool(self._identities) or self.mutual_tls

    def identity(self, context) -> str:
        """The caller's identity; Unauthenticated / PermissionDenied when it has none we serve."""
        common_name = None
        if self.mutual_tls:
            names = context.auth_context().get("x509_common_name") or ()
            if not names:
                raise Unauthenticated("a client certificate with a common name is required")
            common_name = names[0].decode(errors="replace")
            if self.allowed_clients and common_name not in self.allowed_clients:
                raise PermissionDenied("this client certificate is not allowed here")
        if self._identities:
            return self._token_identity(context.invocation_metadata() or ())
        return ANONYMOUS if common_name is None else f"x509:{common_name}"

    def _token_identity(self, metadata) -> str:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            raise Unauthenticated("missing credentials: send the metadata `authorization: Bearer <token>`")
        scheme, _, token = (values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")).partition(" ")
        found = self._identities.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if found is None:
            raise Unauthenticated("invalid credentials")
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an identity this server serves (health checks pass freely)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        return _checked(handler, self.authenticator)


def _checked(handler, authenticator: Authenticator):
    """`handler` whose behavior first checks the caller's identity."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)

    async def refuse(context) -> None:
        try:
            authenticator.identity(context)
        except Unauthenticated as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        except PermissionDenied as error:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))

    if handler.response_streaming:
        async def call(request, context):
            await refuse(context)
            async for response in behavior(request, context):
                yield response
    else:
        async def call(request, context):
            await refuse(context)
            return await behavior(request, context)

    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(call, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
