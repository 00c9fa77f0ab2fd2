"""Checks of the request fields that many RPCs share: request ids, page sizes and page tokens.

A page token is the url-safe base64 of the last position returned (a table's `seq`), so the
next page starts after it whatever was added or removed meanwhile."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import TypeVar

from mesh.errors import InvalidArgument

T = TypeVar("T")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{0,64}")


def check_request_id(request_id: str) -> None:
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            "request_id must be at most 64 letters, digits or ._:-", field="request_id"
        )


def page_size(size: int, *, default: int = 50, most: int = 500) -> int:
    """`size`, or `default` for 0, at most `most`; INVALID_ARGUMENT when negative."""
    if size < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(size or default, most)


def page_position(token: str) -> int | None:
    """The position a page token continues from; None for the first page."""
    if not token:
        return None
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        raise InvalidArgument("page_token is not valid", field="page_token") from None


def page_token(position: int) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode()


def one_page(rows: Sequence[tuple[int, T]], size: int) -> tuple[list[T], str]:
    """The first `size` items of `rows`, (position, item) pairs read `size + 1` at most (one
    more tells that a next page exists), and the token of the next page, empty when none."""
    token = page_token(rows[size - 1][0]) if len(rows) > size else ""
    return [item for _, item in rows[:size]], token
