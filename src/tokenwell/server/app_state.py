"""Typed access to the app's services from a request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from tokenwell.server.app import Services


def services_of(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
