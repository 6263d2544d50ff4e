"""Shared pytest fixtures. Each block belongs to the module it names; append new fixtures, keep the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# -- MQTT: a real Mosquitto per test (tests/support/brokers.py) --------------------------------------------------
from tests.support.brokers import Broker, mosquitto_binary


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A running Mosquitto on a free loopback port (``.url``, ``.restart()``); stopped after the test."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt_url(mosquitto: Broker) -> str:
    """The URL (mqtt://127.0.0.1:<port>) of the ``mosquitto`` fixture's broker."""
    return mosquitto.url


# -- Redis: a real redis-server per test (tests/support/faultkit.py; shared cache tier, fault tests) -------------
from tests.support.faultkit import RedisServer, redis_binary  # noqa: E402


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port (``.url``, ``.stop()``/``.start()``, ``.kill()``)."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
