"""ZeroMQ plumbing: every process binds one PULL inbox and PUSHes to the inboxes of others.

Who may send. Every inbox is a CURVE server, and the ZAP handler of its process
(`zmq.auth`) admits only clients that hold the cluster's key pair (`Wire`): a process without the
cluster's secret key cannot finish the handshake, so nothing it sends is ever read. The keys are
made by the API process and reach the others inside their configs (spawn or Ray), never on a
command line. On one host the inboxes are ipc sockets in a private 0700 directory, so no TCP port
is open at all; across hosts (Ray) they are tcp, under the same CURVE keys. A frame is at most
`MAX_MESSAGE_BYTES` (ZMQ_MAXMSGSIZE): a bigger one drops the sender's connection.

Sends. A send never drops a message silently: when the destination's queue is full (the
high-water mark: the peer died or froze) it waits up to `send_timeout_s` once, then gives up,
counts the failure in `Outboxes.failures`, logs it and returns False, so the caller fails the
request the message was about. While a destination stays full, further sends to it fail at once
instead of each waiting again.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from tetriinfer.cluster import messages as msg

log = logging.getLogger("tetriinfer.zmq")
HIGH_WATER_MARK = 100_000  # messages queued per socket and direction
MAX_MESSAGE_BYTES = 32 * 2**20  # a request body is at most 8 MiB (server.limits); its messages fit
SEND_TIMEOUT_S = 0.1
CLOSE_LINGER_S = 0.5  # a closed Outboxes still delivers what it queued last (a Shutdown) for this long
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")
_MAX_IPC_PATH = 100  # sun_path holds 108 bytes


@dataclass(frozen=True)
class Wire:
    """How one cluster's processes reach each other, and who may send to them."""

    public_key: bytes  # CURVE, Z85: every inbox's server key, and every sender's client key
    secret_key: bytes = field(repr=False)
    cluster_id: str  # public: the ZAP domain, and the name prefix of the cluster's shm segments
    ipc_dir: str | None = None  # one host: the inboxes' ipc sockets live here (mode 0700); None: tcp

    @classmethod
    def create(cls, one_host: bool) -> "Wire":
        public, secret = zmq.curve_keypair()
        ipc_dir = None
        if one_host:
            base = tempfile.gettempdir()
            if len(base) > _MAX_IPC_PATH - 40:
                base = "/tmp"
            ipc_dir = tempfile.mkdtemp(prefix="tetriinfer-", dir=base)  # mode 0700: only this user
        return cls(public, secret, secrets.token_hex(4), ipc_dir)

    def address(self, host: str, port: int | None = None) -> str:
        """Where an inbox binds and its peers connect: `ipc://<ipc_dir>/<port or a random name>`
        on one host; `tcp://host:port` across hosts (port None: any free port, chosen at bind)."""
        if self.ipc_dir is not None:
            return f"ipc://{self.ipc_dir}/{port if port is not None else 'inbox-' + secrets.token_hex(6)}"
        return f"tcp://{host}:{port if port is not None else '*'}"

    def remove(self) -> None:
        """Delete what the cluster leaves on this host once it has stopped (the API process does):
        its ipc directory, and the shm segments of KV a killed instance was sending."""
        from tetriinfer.cluster.kv.shm import cluster_prefix, remove_segments

        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        remove_segments(cluster_prefix(self.cluster_id))


class _ClusterKey:
    """zmq.auth credentials provider: admits the one client key of a cluster."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.public_key)


_guards: dict[int, ThreadAuthenticator] = {}  # id(context) -> its ZAP handler (one per context)
_guards_lock = threading.Lock()


def _guard(context: zmq.Context, wire: Wire) -> None:
    """Start the context's ZAP handler if needed and admit `wire`'s key in its domain."""
    with _guards_lock:
        auth = _guards.get(id(context))
        if auth is None:
            auth = _guards[id(context)] = ThreadAuthenticator(context, log=log)
            auth.start()
        auth.configure_curve_callback(wire.cluster_id, _ClusterKey(wire.public_key))


def _unguard(context: zmq.Context) -> None:
    with _guards_lock:
        auth = _guards.pop(id(context), None)
    if auth is not None:
        auth.stop()


def bind_inbox(socket: zmq.Socket, wire: Wire, host: str, port: int | None = None,
               max_message_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """Bind `socket` as a CURVE server of `wire` at `wire.address(host, port)`; return the address
    peers connect to."""
    _guard(socket.context, wire)
    socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    socket.zap_domain = wire.cluster_id.encode()
    socket.curve_secretkey = wire.secret_key
    socket.curve_publickey = wire.public_key
    socket.curve_server = True
    address = wire.address(host, port)
    if address.startswith("tcp://") and port is None:
        return f"tcp://{host}:{socket.bind_to_random_port(f'tcp://{host}')}"
    socket.bind(address)
    return address


class Inbox:
    """A blocking inbox for the controller and instance loops."""

    def __init__(self, wire: Wire, host: str, port: int | None = None, context: zmq.Context | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL)
        self.address = bind_inbox(self.socket, wire, host, port, max_message_bytes)

    def drain(self, timeout_ms: int) -> list:
        """Every message waiting now; waits up to `timeout_ms` for the first one."""
        out = []
        if timeout_ms > 0 and not self.socket.poll(timeout_ms):
            return out
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(msg.decode(frame))
            except Exception as e:  # noqa: BLE001 - a bad frame must not kill the process
                log.error("dropped an undecodable message: %s", e)

    def close(self) -> None:
        self.socket.close(linger=0)


class AsyncInbox:
    """The API process's inbox, read by an asyncio task. Without a `wire` it makes the cluster's
    (ipc unless `host` is a wildcard, which means other hosts must reach it) and owns it: close()
    deletes its ipc directory."""

    def __init__(self, host: str, port: int | None = None, wire: Wire | None = None) -> None:
        self.owns_wire = wire is None
        self.wire = wire or Wire.create(one_host=host not in WILDCARD_HOSTS)
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.address = bind_inbox(self.socket, self.wire, host, port)

    async def recv(self):
        while True:
            frame = await self.socket.recv()
            try:
                return msg.decode(frame)
            except Exception as e:  # noqa: BLE001
                log.error("dropped an undecodable message: %s", e)

    def close(self) -> None:
        self.socket.close(linger=0)
        _unguard(self.context)
        self.context.term()
        if self.owns_wire:
            self.wire.remove()


class Outboxes:
    """One PUSH socket per destination address (a CURVE client of `wire`), connected on first use."""

    def __init__(self, wire: Wire, context: zmq.Context | None = None, *, send_timeout_s: float = SEND_TIMEOUT_S,
                 high_water_mark: int = HIGH_WATER_MARK) -> None:
        self.wire = wire
        self.context = context or zmq.Context.instance()
        self.send_timeout_s = send_timeout_s
        self.high_water_mark = high_water_mark
        self.failures = 0  # messages not sent since start (each one logged)
        self._sockets: dict[str, zmq.Socket] = {}
        self._stalled: set[str] = set()  # full at the last send: the next one does not wait

    def _socket(self, address: str) -> zmq.Socket:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._sockets[address] = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, self.high_water_mark)
            socket.setsockopt(zmq.LINGER, 0)
            socket.curve_serverkey = self.wire.public_key
            socket.curve_publickey = self.wire.public_key
            socket.curve_secretkey = self.wire.secret_key
            socket.connect(address)
        return socket

    def send(self, address: str, message) -> bool:
        """Queue `message` for `address`. False (counted and logged) when its queue stayed full."""
        socket = self._socket(address)
        frame = msg.encode(message)
        if self._try_send(socket, frame):
            self._stalled.discard(address)
            return True
        if address not in self._stalled and socket.poll(int(self.send_timeout_s * 1000), zmq.POLLOUT):
            if self._try_send(socket, frame):
                return True
        self._stalled.add(address)
        self.failures += 1
        log.error("could not send %s to %s: its queue is full (the peer is gone or stalled); %d sends failed",
                  type(message).__name__, address, self.failures)
        return False

    @staticmethod
    def _try_send(socket: zmq.Socket, frame: bytes) -> bool:
        try:
            socket.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        """Close every socket; what is still queued gets CLOSE_LINGER_S to leave (in the background)."""
        for socket in self._sockets.values():
            socket.close(linger=int(CLOSE_LINGER_S * 1000))
        self._sockets.clear()
