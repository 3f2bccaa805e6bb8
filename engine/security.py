"""ZeroMQ CURVE: authenticated, encrypted links for binding beyond loopback.

``gemmalens keys NAME`` writes ``NAME.key`` (public, share it) and
``NAME.key_secret`` (keep it). An engine serves with its secret key and a
folder of the public keys it accepts; a sink connects with its own secret key
and the engine's public key, and so refuses an engine it does not trust.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

def create_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Writes a CURVE key pair; returns (public, secret) paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def _read(path: str | Path, need_secret: bool):
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a CURVE key file ({error}); create one with `gemmalens keys NAME`") from None
    if need_secret and secret is None:
        raise ConfigError(f"{path}: holds no secret key; pass the NAME.key_secret file")
    return public, secret


class CurveServer:
    """The engine's side: its own key pair and the folder of public keys it accepts."""

    def __init__(self, secret_file: str | Path, allowed_keys: str | Path):
        self.public, self.secret = _read(secret_file, need_secret=True)
        self.allowed = Path(allowed_keys)
        if not self.allowed.is_dir():
            raise ConfigError(f"{self.allowed}: expected a folder of accepted NAME.key public key files")
        self.authenticator: ThreadAuthenticator | None = None

    def serve(self, sock: zmq.Socket) -> None:
        """Makes ``sock`` a CURVE server that accepts only the allowed keys."""
        if self.authenticator is None:
            self.authenticator = ThreadAuthenticator(sock.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=str(self.allowed))
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


class CurveClient:
    """A sink's side: its own key pair and the public key of the engine it trusts."""

    def __init__(self, secret_file: str | Path, server_public_file: str | Path):
        self.public, self.secret = _read(secret_file, need_secret=True)
        self.server, _ = _read(server_public_file, need_secret=False)

    def connect(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


class AddressError(ConfigError):
    """A bus address that ZeroMQ would refuse, or one this command cannot use."""


_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\*|\d{1,5})$")


def check_address(address: str, option: str = "address") -> str:
    """``address`` if it is a ZeroMQ endpoint gemmalens can use (``tcp://HOST:PORT``, ``ipc://PATH``,
    ``inproc://NAME``); otherwise an ``AddressError`` saying what is wrong and what to write instead."""
    text = address.strip()
    scheme, found, rest = text.partition("://")
    if not found:
        hint = f"tcp://{text}" if re.fullmatch(r"[^:/]+:\d+", text) else "tcp://127.0.0.1:5555"
        raise AddressError(f"{option} {address!r}: no transport; write it as {hint} (or ipc://PATH on one machine)")
    if scheme == "tcp":
        match = _TCP.match(text)
        if not match:
            raise AddressError(f"{option} {address!r}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")
        port = match.group(2)
        if port != "*" and not 0 <= int(port) <= 65535:
            raise AddressError(f"{option} {address!r}: port {port} is outside 0-65535")
        return text
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise AddressError(f"{option} {address!r}: {scheme}:// needs a name, e.g. {scheme}:///tmp/gemmalens.bus")
        return text
    raise AddressError(f"{option} {address!r}: unsupported transport {scheme!r}; use tcp://, ipc:// or inproc://")


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host; False for any other transport or host."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = re.sub(r":[^:]*$", "", rest).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: beyond loopback


def check_exposure(addresses: list[str], curve, insecure: bool) -> None:
    """Binding beyond loopback needs CURVE keys unless the user explicitly opts out."""
    exposed = [a for a in addresses if not is_loopback(a)]
    if exposed and curve is None and not insecure:
        raise ConfigError(
            f"binding {', '.join(exposed)} exposes the bus beyond this machine: pass --curve-secret and "
            "--curve-allow (keys from `gemmalens keys`), or --insecure to accept unauthenticated, unencrypted links"
        )
