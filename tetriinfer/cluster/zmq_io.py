"""ZeroMQ plumbing: every process binds one PULL inbox and PUSHes to the inboxes of others.

Sends never block: a peer that died (or stalls) has its queue capped at the high-water mark, and
what does not fit is dropped with a warning; the controller's heartbeat check notices the peer.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from tetriinfer.cluster import messages as msg

log = logging.getLogger("tetriinfer.zmq")
HIGH_WATER_MARK = 100_000


def bind_inbox(socket: zmq.Socket, host: str, port: int | None = None) -> str:
    """Bind `socket` on host:port (a free port when None); return the address peers connect to."""
    socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    socket.setsockopt(zmq.LINGER, 0)
    if port is None:
        port = socket.bind_to_random_port(f"tcp://{host}")
    else:
        socket.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


class Inbox:
    """A blocking inbox for the controller and instance loops."""

    def __init__(self, host: str, port: int | None = None, context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL)
        self.address = bind_inbox(self.socket, host, port)

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
    """The API process's inbox, read by an asyncio task."""

    def __init__(self, host: str, port: int | None = None) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.address = bind_inbox(self.socket, host, port)

    async def recv(self):
        while True:
            frame = await self.socket.recv()
            try:
                return msg.decode(frame)
            except Exception as e:  # noqa: BLE001
                log.error("dropped an undecodable message: %s", e)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class Outboxes:
    """One PUSH socket per destination address, connected on first use."""

    def __init__(self, context: zmq.Context | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}

    def send(self, address: str, message) -> bool:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._sockets[address] = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
        try:
            socket.send(msg.encode(message), zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("dropped %s to %s: its queue is full", type(message).__name__, address)
            return False

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()
