"""Retries for the Hub: transient failures (HTTP 5xx and 429, timeouts, dropped connections) are retried with
exponential backoff, then reported by the caller in one line. Anything else (not found, no access) fails at once."""

import os
import time
from typing import Callable

ATTEMPTS = 4


def transient(error: BaseException) -> bool:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TimeoutException", "TransportError", "ConnectError", "RemoteProtocolError", "ReadError",
                         "ConnectionError", "Timeout", "ConnectionResetError", "BrokenPipeError", "TimeoutError"})


def with_retries(call: Callable, what: str = "", log: Callable = None):
    """`call()`, retried on transient errors (delays of 1, 2, 4 s; `MLX_CONVERT_RETRY_DELAY` scales them)."""
    delay = float(os.environ.get("MLX_CONVERT_RETRY_DELAY", "1"))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001  (sorted below: only transient errors are retried)
            if attempt == ATTEMPTS or not transient(e):
                raise
            if log is not None:
                log(f"{what}: {type(e).__name__}, retrying ({attempt}/{ATTEMPTS - 1})")
            time.sleep(delay * 2 ** (attempt - 1))
