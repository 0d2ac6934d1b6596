"""Which failures are the backend's (retry the whole task later) and which are the data's (blame it).

Names instead of classes: the core imports no client library it does not use (psycopg, redis,
kafka-python, elasticsearch, qdrant-client all raise their own types).
"""

from __future__ import annotations

#: Exception names of unreachable or overloaded backends: psycopg and sqlite3 (``OperationalError``,
#: ``PoolTimeout``), redis, elasticsearch (``ConnectionError``, ``ConnectionTimeout``,
#: ``TransportError``), qdrant-client (``ResponseHandlingException``), kafka-python.
TRANSIENT_ERRORS = {"OperationalError", "PoolTimeout", "ConnectionError", "TimeoutError", "ConnectionTimeout",
                    "TransportError", "ResponseHandlingException", "ServiceUnavailable", "KafkaTimeoutError",
                    "NodeNotReadyError", "RequestTimedOutError", "KafkaConnectionError"}
#: HTTP answers that mean "not now" rather than "not this": throttled, or the server side failing.
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """True when trying the same work again later can succeed."""
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in TRANSIENT_ERRORS:
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and status in TRANSIENT_STATUS
