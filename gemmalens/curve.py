"""ZeroMQ CURVE: authenticated, encrypted links for binding beyond loopback.

``gemmalens keys NAME`` writes ``NAME.key`` (public, share it) and
``NAME.key_secret`` (keep it). An engine serves with its secret key and a
folder of the public keys it accepts; a sink connects with its own secret key
and the engine's public key, and so refuses an engine it does not trust.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError
from .wire import is_loopback


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


def check_exposure(addresses: list[str], curve, insecure: bool) -> None:
    """Binding beyond loopback needs CURVE keys unless the user explicitly opts out."""
    exposed = [a for a in addresses if not is_loopback(a)]
    if exposed and curve is None and not insecure:
        raise ConfigError(
            f"binding {', '.join(exposed)} exposes the bus beyond this machine: pass --curve-secret and "
            "--curve-allow (keys from `gemmalens keys`), or --insecure to accept unauthenticated, unencrypted links"
        )
