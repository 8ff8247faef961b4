"""CurveZMQ keys: ``lmc keys DIR`` and the socket set-up that uses them.

Layout of ``DIR`` (a shared folder readable only by the user)::

    server.key  server.key_secret       the dispatcher's pair (the public half goes to workers)
    client.key  client.key_secret       the workers' pair
    authorized/client.key               public keys the dispatcher accepts (add more here)

The dispatcher encrypts with its pair and runs a ZAP authenticator that accepts only the public
keys in ``authorized/``; a worker needs ``client.key_secret`` and ``server.key``. A peer without a
known key never completes the handshake, so it can neither take jobs nor send results; each
refusal is logged with the peer's address and key.

Every session has keys: ``session_keys(out)`` makes ``OUT/keys`` (mode 0700, secrets 0600) the
first time and reuses it after a restart (remote workers keep theirs); ``--keys DIR`` replaces it.
A secret key file that other users can read is refused (``chmod 600`` it).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from streamer.errors import UserError

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
SESSION_KEYS = "keys"

log = logging.getLogger("lmc.keys")


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


def session_keys(out: str | Path) -> Path:
    """The output folder's own keys, ``OUT/keys`` (created on first use, reused after a restart)."""
    d = Path(out) / SESSION_KEYS
    if not (d / f"{SERVER}.key_secret").exists():
        try:
            create_keys(d)
        except OSError as exc:
            raise KeysError(f"{d}: cannot create the session's CURVE keys ({exc.strerror or exc})") from None
        log.info("%s: created this output folder's CURVE keys (remote workers: --keys %s)", d, d)
    return d


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeysError(f"{path}: key file not found (create keys with `lmc keys DIR`)")
    if secret and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise KeysError(f"{path}: secret key readable by other users (chmod 600 {path})")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path}: not a CURVE key file ({exc})") from None
    if secret and not secret_key:
        raise KeysError(f"{path}: holds no secret key")
    return public, secret_key


class _LoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, telling ``on_refused`` (and the log) about every handshake it refuses."""

    def __init__(self, context: zmq.Context, on_refused: Callable[[str], None] | None) -> None:
        super().__init__(context, log=logging.getLogger("lmc.keys.zap"))
        self.on_refused = on_refused
        self._request: tuple[str, str] = ("", "")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        mechanism = msg[5].decode(errors="replace") if len(msg) > 5 else "?"
        key = zmq.utils.z85.encode(msg[6]).decode() if mechanism == "CURVE" and len(msg) > 6 and len(msg[6]) == 32 else ""
        self._request = (address, f"{mechanism} key {key}" if key else mechanism)
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: Any = "anonymous") -> None:
        super()._send_zap_reply(request_id, status_code, status_text, user_id)  # the handshake never waits on us
        if status_code == b"200":
            return
        address, what = self._request
        text = f"{status_text.decode(errors='replace')}: {what} from {address}"
        try:
            if self.on_refused is not None:
                self.on_refused(text)
            else:
                log.warning("refused a connection: %s", text)
        except Exception:  # reporting must never stop the authenticator
            log.exception("could not report a refused connection (%s)", text)


def setup_server(context: zmq.Context, socket: zmq.Socket, directory: str | Path,
                 on_refused: Callable[[str], None] | None = None) -> ThreadAuthenticator:
    """Make ``socket`` a CURVE server accepting only ``directory/authorized/*.key``; every refused
    handshake goes to ``on_refused(text)`` (default: a log warning).

    Call before ``bind``. Returns the running authenticator; stop it when the socket closes.
    """
    d = Path(directory)
    public, secret = _load(d / f"{SERVER}.key_secret", secret=True)
    allowed = d / AUTHORIZED
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise KeysError(f"{allowed}: no authorized client keys (create keys with `lmc keys DIR`)")
    auth = _LoggingAuthenticator(context, on_refused)
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
