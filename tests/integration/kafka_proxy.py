"""A loopback TCP proxy in front of a real broker that can lose Kafka requests on the way.

A lost request is what a broker restart does to a request already written to its socket: the client
never hears back. Kafka answers requests of a connection in order, so the proxy loses only requests a
connection sends alone (a JoinGroup on the coordinator connection, whose heartbeats pause during a
join); the client then waits out the request's own timeout.
"""

from __future__ import annotations

import socket
import struct
import threading

#: Kafka API keys (https://kafka.apache.org/protocol#protocol_api_keys).
JOIN_GROUP = 11


class LossyKafkaProxy:
    """Forwards ``127.0.0.1:port`` to the broker, dropping the next ``drop[api_key]`` requests of each key."""

    def __init__(self, broker_port: int, port: int = 0):
        self.broker_port = broker_port
        self.drop: dict[int, int] = {}
        self.dropped: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="kafka-proxy").start()

    def lose_next(self, api_key: int, count: int = 1) -> None:
        with self._lock:
            self.drop[api_key] = self.drop.get(api_key, 0) + count

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.broker_port))
            self._sockets += [client, broker]
            threading.Thread(target=self._requests, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._responses, args=(broker, client), daemon=True).start()

    def _lose(self, frame: bytes) -> bool:
        api_key = struct.unpack(">h", frame[4:6])[0]
        with self._lock:
            if self.drop.get(api_key, 0) <= 0:
                return False
            self.drop[api_key] -= 1
            self.dropped[api_key] = self.dropped.get(api_key, 0) + 1
            return True

    def _requests(self, client: socket.socket, broker: socket.socket) -> None:
        """Client to broker, one whole request frame (int32 size, then api_key int16 ...) at a time."""
        try:
            while True:
                head = _read(client, 4)
                frame = head + _read(client, struct.unpack(">i", head)[0])
                if not self._lose(frame):
                    broker.sendall(frame)
        except (OSError, EOFError):
            _shut(client, broker)

    @staticmethod
    def _responses(broker: socket.socket, client: socket.socket) -> None:
        try:
            while data := broker.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        _shut(client, broker)


def _read(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _shut(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
