"""Where the SDK reaches a server, and which TLS certificates it trusts there.

Why: a person names a server by one URL, whatever they saw first (`https://chat.example.com`,
`wss://chat.example.com/v1/ws`, `http://127.0.0.1:8080`), but REST calls and blob transfers
need its http(s) form and the connection its ws(s) form: `endpoint` derives both, TLS for both
or for neither. Behind a TLS terminator (docs/operations.md, "TLS") a self-hosted server's
certificate is often signed by a private CA (a company's, or one made for a test): `ca_file`
names that CA's bundle (PEM), trusted on top of the system's trust store, so that URLs signed
for a public blob store (S3) still verify too. aiohttp's TLS failures become `TlsFailed`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from pigeon.client.errors import TlsFailed

#: A CA bundle's path, as the SDK's functions take it.
CaFile = str | os.PathLike[str]

#: The scheme REST and blob transfers use for each scheme a server URL may have.
_HTTP = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS_PATH = "/v1/ws"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server as the SDK talks to it."""

    #: `http(s)://host[:port][/prefix]`, no trailing slash: REST and relative blob URLs.
    base: str
    #: `ws(s)://host[:port][/prefix]/v1/ws`: the device's connection.
    ws: str
    #: What aiohttp is given as `ssl`: True (the system's trust store) or a context that also
    #: trusts `ca_file`.
    ssl: ssl.SSLContext | bool


def endpoint(url: str, ca_file: CaFile | None = None) -> Endpoint:
    """The endpoint of a server URL (`http`, `https`, `ws` or `wss`; `http` if none is given;
    with or without the trailing `/v1/ws`). Raises `ValueError` for another scheme and
    `TlsFailed` for a CA bundle that cannot be read."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    scheme = _HTTP.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"{url}: a Pigeon server's URL is http(s):// or ws(s)://")
    path = parts.path.rstrip("/").removesuffix(_WS_PATH).rstrip("/")
    base = urlunsplit((scheme, parts.netloc, path, "", ""))
    ws = urlunsplit(("wss" if scheme == "https" else "ws", parts.netloc, path + _WS_PATH, "", ""))
    return Endpoint(base=base, ws=ws, ssl=tls_context(ca_file))


def tls_context(ca_file: CaFile | None) -> ssl.SSLContext | bool:
    """True (aiohttp verifies against the system's trust store) without `ca_file`; else a
    verifying context that trusts the system's CAs and those of `ca_file` (a PEM bundle)."""
    if ca_file is None:
        return True
    context = ssl.create_default_context()  # certificate and host name checked
    try:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    except OSError as exc:  # a missing file, or one without a certificate (ssl.SSLError)
        why = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else exc
        raise TlsFailed(f"CA bundle {os.fspath(ca_file)}: {why}") from None
    return context


@contextmanager
def tls_errors() -> Iterator[None]:
    """Inside: aiohttp's TLS failures are raised as `TlsFailed`, saying whether the server's
    certificate was not trusted (what a private CA's bundle, `ca_file`, fixes)."""
    try:
        yield
    except aiohttp.ClientConnectorCertificateError as exc:
        where = f"{exc.host}:{exc.port}"
        raise TlsFailed(
            f"the certificate of {where} is not trusted: {exc.certificate_error.verify_message}"
            if isinstance(exc.certificate_error, ssl.SSLCertVerificationError)
            else f"the certificate of {where} is not trusted: {exc.certificate_error}",
            untrusted=True,
        ) from exc
    except aiohttp.ClientSSLError as exc:
        raise TlsFailed(f"TLS with {exc.host}:{exc.port} failed: {exc}") from exc
