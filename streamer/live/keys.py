"""CurveZMQ keys: ``lmc keys DIR`` and the socket set-up that uses them.

Layout of ``DIR`` (a shared folder readable only by the user)::

    server.key  server.key_secret       the dispatcher's pair (the public half goes to workers)
    client.key  client.key_secret       the workers' pair
    authorized/client.key               public keys the dispatcher accepts (add more here)

The dispatcher encrypts with its pair and runs a ZAP authenticator that accepts only the public
keys in ``authorized/``; a worker needs ``client.key_secret`` and ``server.key``. A peer without a
known key never completes the handshake, so it can neither take jobs nor send results.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from streamer.errors import UserError

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"


class KeysError(UserError, ValueError):
    """Missing or unreadable CURVE key files."""


def create_keys(directory: str | Path) -> list[Path]:
    """Create the server and client key pairs in ``directory``; return the files written.

    Refuses to overwrite existing keys (workers elsewhere may hold them).
    """
    d = Path(directory)
    if (d / f"{SERVER}.key_secret").exists() or (d / f"{CLIENT}.key_secret").exists():
        raise KeysError(f"{d}: keys already exist (delete them first to make new ones)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    written: list[Path] = []
    for name in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    auth = d / AUTHORIZED
    auth.mkdir(exist_ok=True)
    shutil.copyfile(d / f"{CLIENT}.key", auth / f"{CLIENT}.key")
    written.append(auth / f"{CLIENT}.key")
    return written


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeysError(f"{path}: key file not found (create keys with `lmc keys DIR`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path}: not a CURVE key file ({exc})") from None
    if secret and not secret_key:
        raise KeysError(f"{path}: holds no secret key")
    return public, secret_key


def setup_server(context: zmq.Context, socket: zmq.Socket, directory: str | Path) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server accepting only ``directory/authorized/*.key``.

    Call before ``bind``. Returns the running authenticator; stop it when the socket closes.
    """
    d = Path(directory)
    public, secret = _load(d / f"{SERVER}.key_secret", secret=True)
    allowed = d / AUTHORIZED
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise KeysError(f"{allowed}: no authorized client keys (create keys with `lmc keys DIR`)")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def setup_client(socket: zmq.Socket, directory: str | Path) -> None:
    """Give ``socket`` the client pair and the server's public key. Call before ``connect``."""
    d = Path(directory)
    public, secret = _load(d / f"{CLIENT}.key_secret", secret=True)
    server_public, _ = _load(d / f"{SERVER}.key", secret=False)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public
