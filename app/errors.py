"""Client errors raised by the decoding and serving code, mapped to HTTP by one handler."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(Exception):
    """A request the service cannot use; ``detail`` tells the caller what to fix."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
