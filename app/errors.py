"""Client errors raised by the decoding and serving code, mapped to HTTP by one handler."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["InputError"]


class InputError(Exception):
    """A request the service cannot use; ``detail`` tells the caller what to fix.

    ``headers`` go out with the answer: ``Retry-After`` on a 503, ``Connection: close`` on a 408.
    """

    def __init__(self, status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = dict(headers) if headers else {}
