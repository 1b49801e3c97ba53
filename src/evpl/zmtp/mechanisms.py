"""ZMTP security mechanisms, sans I/O: NULL (spec 37), PLAIN (spec 24) and
CURVE (CurveZMQ, spec 26, over libsodium through PyNaCl; keys in Z85, spec 32).

A mechanism is the handshake after the greeting: ``start()`` gives the
commands to send first, ``on_command(cmd)`` those to send in answer, until
``done``; the peer's metadata (Socket-Type, Identity, user properties) is
then in ``peer_props``. CURVE also wraps every later message:
``encode_frames`` / ``decode_message``.

Authentication is a hook (the role ZAP plays in libzmq): a server-side
callable ``authenticator(mechanism, credentials) -> bool`` is asked with
``("PLAIN", (username, password))`` or ``("CURVE", (client_public_key,))``
(the 32-byte key) and refuses the peer by returning False.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from evpl.errors import ProtocolError
from evpl.zmtp.wire import (
    Command,
    decode_metadata,
    encode_command,
    encode_frame,
    encode_metadata,
    ready,
    z85_decode,
    z85_encode,
)

__all__ = [
    "AuthenticationError",
    "Authenticator",
    "Curve",
    "HandshakeError",
    "Mechanism",
    "Null",
    "Plain",
    "curve_keypair",
    "curve_public",
    "make_mechanism",
]

Authenticator = Callable[[str, tuple[bytes, ...]], bool]


class HandshakeError(ProtocolError):
    """The security handshake failed: the peer broke the mechanism's rules."""


class AuthenticationError(HandshakeError):
    """The authenticator refused the peer's credentials, or the peer refused
    ours (it sent ERROR)."""


class Mechanism:
    """Base: the handshake state of one connection."""

    name = "NULL"

    def __init__(self, props: dict[str, bytes], as_server: bool) -> None:
        self.props = props
        self.as_server = as_server
        self.done = False
        self.peer_props: dict[str, bytes] = {}
        self.user_id = b""
        self.encrypts = False

    def start(self) -> list[bytes]:
        """The commands to send right after the greeting."""
        return []

    def on_command(self, cmd: Command) -> list[bytes]:
        """Handle one handshake command; return the commands to send."""
        raise NotImplementedError

    def _peer_ready(self, meta: bytes) -> None:
        self.peer_props = decode_metadata(meta)
        self.done = True

    @staticmethod
    def _refused(cmd: Command) -> HandshakeError:
        if cmd.name == "ERROR":
            d = cmd.data
            reason = d[1:1 + d[0]].decode("utf-8", "replace") if d else ""
            return AuthenticationError(f"peer refused the handshake: {reason or '(no reason)'}")
        return HandshakeError(f"unexpected {cmd.name} command during the handshake")


class Null(Mechanism):
    """NULL: no security, both sides send READY with their metadata. With
    an authenticator (a socket with a ZAP domain), it is asked
    ``("NULL", ())`` before READY goes out, as libzmq asks ZAP."""

    name = "NULL"

    def __init__(self, props: dict[str, bytes], as_server: bool, *,
                 authenticator: Authenticator | None = None) -> None:
        super().__init__(props, as_server)
        self.authenticator = authenticator

    def start(self) -> list[bytes]:
        if self.authenticator is not None and not self.authenticator("NULL", ()):
            raise AuthenticationError("NULL peer refused")
        return [ready(self.props)]

    def on_command(self, cmd: Command) -> list[bytes]:
        if cmd.name != "READY" or self.done:
            raise self._refused(cmd)
        self._peer_ready(cmd.data)
        return []


class Plain(Mechanism):
    """PLAIN (spec 24): a clear-text user name and password, checked by the
    server's authenticator (none: any credentials are accepted)."""

    name = "PLAIN"

    def __init__(self, props: dict[str, bytes], as_server: bool, *, username: bytes = b"",
                 password: bytes = b"", authenticator: Authenticator | None = None) -> None:
        super().__init__(props, as_server)
        if len(username) > 255 or len(password) > 255:
            raise ValueError("PLAIN user name and password are at most 255 bytes")
        self.username = username
        self.password = password
        self.authenticator = authenticator
        self._state = "hello" if as_server else "welcome"

    def start(self) -> list[bytes]:
        if self.as_server:
            return []
        u, p = self.username, self.password
        return [encode_command("HELLO", bytes((len(u),)) + u + bytes((len(p),)) + p)]

    def on_command(self, cmd: Command) -> list[bytes]:
        st = self._state
        if self.as_server and st == "hello" and cmd.name == "HELLO":
            d = cmd.data
            if not d or len(d) < 1 + d[0] + 1 or len(d) != 2 + d[0] + d[1 + d[0]]:
                raise HandshakeError("malformed PLAIN HELLO")
            user = d[1:1 + d[0]]
            pw = d[2 + d[0]:]
            ok = self.authenticator is None or bool(self.authenticator("PLAIN", (user, pw)))
            if not ok:
                self._state = "failed"
                raise AuthenticationError("PLAIN credentials refused")
            self.user_id = user
            self._state = "initiate"
            return [encode_command("WELCOME")]
        if self.as_server and st == "initiate" and cmd.name == "INITIATE":
            self._peer_ready(cmd.data)
            return [ready(self.props)]
        if not self.as_server and st == "welcome" and cmd.name == "WELCOME":
            self._state = "ready"
            return [encode_command("INITIATE", encode_metadata(self.props))]
        if not self.as_server and st == "ready" and cmd.name == "READY":
            self._peer_ready(cmd.data)
            return []
        raise self._refused(cmd)


# ---- CURVE ---------------------------------------------------------------------

def _nacl() -> Any:
    try:
        from nacl import bindings
    except ImportError:
        raise ImportError("CURVE needs PyNaCl (pip install pynacl)") from None
    return bindings


def curve_keypair() -> tuple[bytes, bytes]:
    """A new CURVE key pair as Z85 text ``(public, secret)``, 40 bytes each
    (as ``zmq.curve_keypair()`` returns them)."""
    pk, sk = _nacl().crypto_box_keypair()
    return z85_encode(pk), z85_encode(sk)


def curve_public(secret: bytes | str) -> bytes:
    """The Z85 public key of a Z85 (or raw 32-byte) secret key."""
    return z85_encode(_nacl().crypto_scalarmult_base(_key(secret)))


def _key(k: bytes | str) -> bytes:
    """A 32-byte key from Z85 text (40 characters) or raw bytes."""
    if isinstance(k, str):
        k = k.encode("ascii")
    if len(k) == 40:
        return z85_decode(k)
    if len(k) == 32:
        return bytes(k)
    raise ValueError(f"a CURVE key is 32 bytes or 40 Z85 characters, got {len(k)}")


class Curve(Mechanism):
    """CURVE (CurveZMQ, spec 26): both sides prove their long-term keys,
    every later message travels in a box of the connection's short-term
    keys. A client needs the server's public key; the server's authenticator
    sees the client's long-term public key."""

    name = "CURVE"

    def __init__(self, props: dict[str, bytes], as_server: bool, *,
                 public_key: bytes | str | None = None, secret_key: bytes | str | None = None,
                 server_key: bytes | str | None = None,
                 authenticator: Authenticator | None = None) -> None:
        super().__init__(props, as_server)
        nb = self._nb = _nacl()
        if secret_key is None:
            raise ValueError("CURVE needs curve_secretkey (and curve_publickey)")
        self.sk = _key(secret_key)
        self.pk = _key(public_key) if public_key is not None else nb.crypto_scalarmult_base(self.sk)
        if not as_server:
            if server_key is None:
                raise ValueError("a CURVE client needs curve_serverkey")
            self.server_pk = _key(server_key)
        self.authenticator = authenticator
        self.encrypts = True
        self._tx_nonce = 0
        self._rx_nonce = 0
        self._eph_pk, self._eph_sk = nb.crypto_box_keypair()
        self._peer_eph: bytes = b""
        self._shared = b""
        self._state = "hello" if as_server else "welcome"
        self._tx_prefix = b"CurveZMQMESSAGES" if as_server else b"CurveZMQMESSAGEC"
        self._rx_prefix = b"CurveZMQMESSAGEC" if as_server else b"CurveZMQMESSAGES"

    def _next_nonce(self) -> bytes:
        self._tx_nonce += 1
        return struct.pack(">Q", self._tx_nonce)

    def _check_nonce(self, short: bytes) -> None:
        (n,) = struct.unpack(">Q", short)
        if n <= self._rx_nonce:
            raise HandshakeError("CURVE nonce replayed or out of order")
        self._rx_nonce = n

    def _open(self, box: bytes, nonce: bytes, pk: bytes, sk: bytes, what: str) -> bytes:
        try:
            return self._nb.crypto_box_open(box, nonce, pk, sk)
        except Exception:
            raise HandshakeError(f"CURVE {what} box does not open (wrong keys?)") from None

    # -- client
    def start(self) -> list[bytes]:
        if self.as_server:
            return []
        short = self._next_nonce()
        box = self._nb.crypto_box(b"\x00" * 64, b"CurveZMQHELLO---" + short, self.server_pk,
                                  self._eph_sk)
        return [encode_command("HELLO", b"\x01\x00" + b"\x00" * 72 + self._eph_pk + short + box)]

    def on_command(self, cmd: Command) -> list[bytes]:
        if cmd.name == "ERROR":
            raise self._refused(cmd)
        st = self._state
        d = cmd.data
        if not self.as_server:
            if st == "welcome" and cmd.name == "WELCOME":
                if len(d) != 16 + 144:
                    raise HandshakeError("malformed CURVE WELCOME")
                plain = self._open(d[16:], b"WELCOME-" + d[:16], self.server_pk, self._eph_sk,
                                   "WELCOME")
                self._peer_eph, cookie = plain[:32], plain[32:]
                self._shared = self._nb.crypto_box_beforenm(self._peer_eph, self._eph_sk)
                vnonce = os.urandom(16)
                vouch = vnonce + self._nb.crypto_box(self._eph_pk + self.server_pk,
                                                     b"VOUCH---" + vnonce, self._peer_eph, self.sk)
                short = self._next_nonce()
                box = self._nb.crypto_box_afternm(self.pk + vouch + encode_metadata(self.props),
                                                  b"CurveZMQINITIATE" + short, self._shared)
                self._state = "ready"
                return [encode_command("INITIATE", cookie + short + box)]
            if st == "ready" and cmd.name == "READY":
                if len(d) < 8 + 16:
                    raise HandshakeError("malformed CURVE READY")
                self._check_nonce(d[:8])
                try:
                    meta = self._nb.crypto_box_open_afternm(d[8:], b"CurveZMQREADY---" + d[:8],
                                                            self._shared)
                except Exception:
                    raise HandshakeError("CURVE READY box does not open") from None
                self._peer_ready(meta)
                return []
            raise self._refused(cmd)
        # -- server
        if st == "hello" and cmd.name == "HELLO":
            if len(d) != 2 + 72 + 32 + 8 + 80 or d[:2] != b"\x01\x00":
                raise HandshakeError("malformed CURVE HELLO (or an unknown version)")
            self._peer_eph = d[74:106]
            short = d[106:114]
            self._check_nonce(short)
            plain = self._open(d[114:], b"CurveZMQHELLO---" + short, self._peer_eph, self.sk,
                               "HELLO")
            if plain != b"\x00" * 64:
                raise HandshakeError("CURVE HELLO signature is not zeros")
            self._cookie_key = os.urandom(32)
            cnonce = os.urandom(16)
            cookie = cnonce + self._nb.crypto_secretbox(self._peer_eph + self._eph_sk,
                                                        b"COOKIE--" + cnonce, self._cookie_key)
            wnonce = os.urandom(16)
            box = self._nb.crypto_box(self._eph_pk + cookie, b"WELCOME-" + wnonce, self._peer_eph,
                                      self.sk)
            self._state = "initiate"
            return [encode_command("WELCOME", wnonce + box)]
        if st == "initiate" and cmd.name == "INITIATE":
            if len(d) < 96 + 8 + 16 + 32 + 96:
                raise HandshakeError("malformed CURVE INITIATE")
            cookie, short, box = d[:96], d[96:104], d[104:]
            try:
                c = self._nb.crypto_secretbox_open(cookie[16:], b"COOKIE--" + cookie[:16],
                                                   self._cookie_key)
            except Exception:
                raise HandshakeError("CURVE INITIATE cookie does not open") from None
            if c[:32] != self._peer_eph:
                raise HandshakeError("CURVE INITIATE cookie is not this connection's")
            self._check_nonce(short)
            self._shared = self._nb.crypto_box_beforenm(self._peer_eph, self._eph_sk)
            try:
                plain = self._nb.crypto_box_open_afternm(box, b"CurveZMQINITIATE" + short,
                                                         self._shared)
            except Exception:
                raise HandshakeError("CURVE INITIATE box does not open") from None
            client_pk, vouch, meta = plain[:32], plain[32:128], plain[128:]
            v = self._open(vouch[16:], b"VOUCH---" + vouch[:16], client_pk, self._eph_sk, "vouch")
            if v != self._peer_eph + self.pk:
                raise HandshakeError("CURVE vouch does not match the connection")
            if self.authenticator is not None and not self.authenticator("CURVE", (client_pk,)):
                self._state = "failed"
                raise AuthenticationError("CURVE client key refused")
            self.user_id = client_pk
            self._peer_ready(meta)
            rshort = self._next_nonce()
            rbox = self._nb.crypto_box_afternm(encode_metadata(self.props),
                                               b"CurveZMQREADY---" + rshort, self._shared)
            return [encode_command("READY", rshort + rbox)]
        raise self._refused(cmd)

    # -- traffic
    def encode_frames(self, frames: Sequence[Any], command: bool = False) -> Any:
        """An outgoing message's wire form: each frame boxed in a MESSAGE
        (flags byte inside the box: MORE, COMMAND), each sent as a frame of
        its own without flags, as libzmq does."""
        bodies = []
        last = len(frames) - 1
        afternm = self._nb.crypto_box_afternm
        prefix = self._tx_prefix
        for i, f in enumerate(frames):
            short = self._next_nonce()
            flags = (1 if i < last else 0) | (2 if command else 0)
            bodies.append(b"\x07MESSAGE" + short
                          + afternm(bytes((flags,)) + bytes(f), prefix + short, self._shared))
        return b"".join(encode_frame(b) for b in bodies)

    def decode_frame(self, data: bytes) -> tuple[int, bytes]:
        """Open one MESSAGE command's data: ``(flags, frame)``."""
        if len(data) < 8 + 17:
            raise HandshakeError("malformed CURVE MESSAGE")
        short = data[:8]
        self._check_nonce(short)
        try:
            plain = self._nb.crypto_box_open_afternm(data[8:], self._rx_prefix + short,
                                                     self._shared)
        except Exception:
            raise HandshakeError("CURVE MESSAGE box does not open") from None
        return plain[0], plain[1:]


def make_mechanism(name: str, props: dict[str, bytes], as_server: bool,
                   options: dict[str, Any]) -> Mechanism:
    """Build the mechanism ``name`` from a socket's options."""
    if name == "NULL":
        return Null(props, as_server, authenticator=options.get("authenticator"))
    if name == "PLAIN":
        return Plain(props, as_server, username=options.get("plain_username") or b"",
                     password=options.get("plain_password") or b"",
                     authenticator=options.get("authenticator"))
    if name == "CURVE":
        return Curve(props, as_server, public_key=options.get("curve_publickey"),
                     secret_key=options.get("curve_secretkey"),
                     server_key=options.get("curve_serverkey"),
                     authenticator=options.get("authenticator"))
    raise ValueError(f"unknown mechanism {name!r}")

