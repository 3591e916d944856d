"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket

import pytest


class NetworkAttempt(AssertionError):
    """Raised when code under test tries to open a network connection or resolve a host name."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Block every socket connect and host lookup for the test; each attempt raises and is recorded."""
    attempts: list[str] = []

    def refuse(what: str):
        def hook(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args[:2]}")
            raise NetworkAttempt(f"network access during a cpu-profile run: {attempts[-1]}")

        return hook

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts
