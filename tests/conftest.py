"""Shared pytest fixtures. Each block belongs to the module it names; append new fixtures, keep the others."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import Broker, mosquitto_binary
from tests.support.faultkit import RedisServer, redis_binary


def _running(make: Callable[[], Any], missing: str | None) -> Iterator[Any]:
    """A server made by ``make()``, started, yielded and stopped; the test is skipped when ``missing`` says why."""
    if missing is not None:
        pytest.skip(missing)
    server = make()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- MQTT: a real Mosquitto per test (tests/support/brokers.py) --------------------------------------------------
@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A running Mosquitto on a free loopback port (``.url``, ``.restart()``); stopped after the test."""
    missing = None if mosquitto_binary() else "mosquitto is not installed (make setup installs it)"
    yield from _running(lambda: Broker(tmp_path / "mosquitto"), missing)


@pytest.fixture
def mqtt_url(mosquitto: Broker) -> str:
    """The URL (mqtt://127.0.0.1:<port>) of the ``mosquitto`` fixture's broker."""
    return mosquitto.url


# -- Redis: a real redis-server per test (tests/support/faultkit.py; shared cache tier, fault tests) -------------
@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port (``.url``, ``.stop()``/``.start()``, ``.kill()``)."""
    missing = None if redis_binary() else "redis-server is not installed (make setup installs it)"
    yield from _running(lambda: RedisServer(tmp_path / "redis"), missing)
