"""OPC UA session security: client certificates (given or generated), security policy and mode, the
pinned server certificate, username/password, and one clear sentence for a connect that failed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509

from drivers.opcua.config import OpcUaConnection


class ConfigFault(Exception):
    """A connection setting that cannot work (a missing certificate file)."""


_HINTS = (
    (("BadUserAccessDenied", "BadIdentityToken"), "the server refused the user: check username and password"),
    (("BadSecurityPolicyRejected",), "the server offers no endpoint with this security_policy/security_mode"),
    (
        ("BadCertificate", "BadSecurityChecksFailed", "BadNonceInvalid"),
        "certificate or signature check failed: check server_certificate_file and that the server trusts"
        " our certificate",
    ),
    (("BadTcpEndpointUrlInvalid",), "the server does not know this endpoint URL"),
)


def _hint(name: str) -> str:
    for prefixes, hint in _HINTS:
        if name.startswith(prefixes):
            return hint
    return ""


def certificate_uri(path: Path) -> str | None:
    """The application URI (subjectAltName URI) a certificate carries."""
    data = path.read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(data)
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def set_user(client: Client, conn: OpcUaConnection) -> None:
    """Username and password (resolved from `password_file`/`password_env` at load; never logged), if set."""
    if conn.username:
        client.set_user(conn.username)
        password = conn.secret("password")
        if password:
            client.set_password(password)


async def setup_security(client: Client, conn: OpcUaConnection, state_dir: Path, equipment_id: str, log: Any) -> None:
    """Sign or encrypt with the configured certificate, or one generated once under `state_dir/opcua`.

    Raises ConfigFault for files that are missing or do not match `application_uri`.
    """
    if not conn.secure:
        return
    cert, key = conn.certificate_file, conn.private_key_file
    if cert is None or key is None:
        folder = state_dir / "opcua"
        cert, key = folder / f"{equipment_id}-cert.der", folder / f"{equipment_id}-key.pem"
        if not (cert.exists() and key.exists()):
            client.application_uri = conn.application_uri or f"urn:{socket.gethostname()}:edge-agent:{equipment_id}"
            await client.setup_self_signed_certificate(key, cert)
            with contextlib.suppress(OSError):
                key.chmod(0o600)
            log.info("client_certificate_generated", certificate=str(cert), application_uri=client.application_uri)
    for path, field in ((cert, "certificate_file"), (key, "private_key_file")):
        if not path.is_file():
            raise ConfigFault(f"{field} {path} does not exist")
    try:
        uri = certificate_uri(cert)
    except (OSError, ValueError) as err:
        raise ConfigFault(f"certificate_file {cert} is not a certificate: {err}") from err
    if conn.application_uri and uri and conn.application_uri != uri:
        raise ConfigFault(f"application_uri {conn.application_uri} differs from the URI in {cert} ({uri})")
    # The server checks that the session's application URI is the one in our certificate.
    client.application_uri = uri or conn.application_uri or client.application_uri
    server_cert: str | None = None
    if conn.server_certificate_file is not None:
        if not conn.server_certificate_file.is_file():
            raise ConfigFault(f"server_certificate_file {conn.server_certificate_file} does not exist")
        server_cert = str(conn.server_certificate_file)
    mode = getattr(ua.MessageSecurityMode, conn.mode)
    await client.set_security(
        security_policies.SecurityPolicyBasic256Sha256,
        str(cert),
        str(key),
        server_certificate=server_cert,
        mode=mode,
    )


def describe(err: BaseException, conn: OpcUaConnection) -> str:
    """One clear sentence for a failed connect, naming the endpoint and the cause; no secrets."""
    where = f"OPC UA server {conn.endpoint}"
    if isinstance(err, ua.UaStatusCodeError):
        name = ua.StatusCode(err.code).name
        hint = _hint(name)
        return f"{where} refused the connection: {name}" + (f" ({hint})" if hint else "")
    if isinstance(err, ua.UaError) and "certificate mismatch" in str(err).lower():
        return f"{where} presented a certificate that differs from server_certificate_file (pinned)"
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        if conn.secure:
            return (
                f"{where} did not answer within {conn.timeout_s:g} s (with security on, a wrong "
                "server_certificate_file or an untrusted client certificate looks like this)"
            )
        return f"{where} did not answer within {conn.timeout_s:g} s"
    if isinstance(err, ConnectionRefusedError):
        return f"{where} is unreachable: connection refused"
    if isinstance(err, ConnectionError) and str(err) in ("", "Connection is not open"):
        return f"{where} closed the connection" + (
            " during the secure-channel handshake (check security_policy/security_mode and server_certificate_file)"
            if conn.secure
            else " (does it accept security None? it may offer only secure endpoints)"
        )
    if isinstance(err, OSError):
        return f"{where} is unreachable: {err.strerror or err}"
    if isinstance(err, ConfigFault):
        return str(err)
    return f"{where}: connect failed: {type(err).__name__}: {err}"


async def _probe_endpoints(conn: OpcUaConnection) -> list[ua.EndpointDescription] | None:
    """The server's endpoints over an unauthenticated channel, to explain a refusal; None if unknown."""
    probe = Client(conn.endpoint, timeout=conn.timeout_s)
    try:
        async with asyncio.timeout(conn.timeout_s):
            return await probe.connect_and_get_server_endpoints()
    except Exception:
        return None


async def explain(err: BaseException, conn: OpcUaConnection) -> str:
    """A failed connect in one sentence; asks the server's endpoints where that makes it precise."""
    message = describe(err, conn)
    if isinstance(err, ua.UaError) and "no matching endpoints" in str(err).lower():
        endpoints = await _probe_endpoints(conn) or []
        offered = ", ".join(
            sorted({f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name.rstrip('_')}" for e in endpoints})
        )
        wanted = f"security_policy {conn.security_policy} / security_mode {conn.mode}"
        return f"OPC UA server {conn.endpoint} offers no endpoint with {wanted} (it offers: {offered or 'unknown'})"
    if conn.secure and conn.server_certificate_file is not None and isinstance(err, (TimeoutError, ConnectionError)):
        probed = await _probe_endpoints(conn)
        if probed:
            with contextlib.suppress(Exception):
                pinned = uacrypto.der_from_x509(await uacrypto.load_certificate(str(conn.server_certificate_file)))
                if all(e.ServerCertificate and e.ServerCertificate[: len(pinned)] != pinned for e in probed):
                    return (
                        f"OPC UA server {conn.endpoint} presents a certificate that differs from "
                        f"server_certificate_file {conn.server_certificate_file} (pinned)"
                    )
    return message
