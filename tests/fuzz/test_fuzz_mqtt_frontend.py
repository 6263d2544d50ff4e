"""Fuzzing the gateway's MQTT front end through a real Mosquitto.

The front end (gateway/frontends/mqtt.py, shared subscriptions, a real SQLite registry, the gateway's rate limiter)
runs on its own event loop in a thread; a fuzzing client publishes random payloads (CBOR shaped like every message,
any CBOR, raw bytes, CBOR with tags and indefinite lengths, empty) at QoS 0/1, sometimes retained, on
``ida/v1/d/<key>/<leaf>`` with random and weird topic keys (bad percent escapes, other devices, empty, long,
non-ASCII, '$') and every leaf. After every example a device (tests.support.brokers style: MQTT 3.1.1, its own subtree)
resolves and reports and must get the right answers; the whole time every log record and asyncio exception-handler
call is collected and a traceback, an ERROR or "Task exception was never retrieved" fails the test.

Campaign size: IDA_FUZZ_EXAMPLES (tests/support/fuzzing.py) multiplies the examples.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from gateway.frontends.mqtt import MqttFrontEnd
from gateway.metrics import Metrics
from gateway.ratelimit import Limits, RateLimiter
from gateway.registry import Registry
from proto import devicemsg
from tests.support.brokers import Broker, mosquitto_binary
from tests.support.fuzzing import LogWatch, LoopThread, cbor_payloads, fuzz_settings, watch_logs
from tests.support.gwhelpers import PUMP, FakeResolver, report_fields

LEAVES = ["req", "rpt", "cfgack", "status", "res", "ack", "cfg", "x", ""]
KEYS = [
    devicemsg.topic_key(PUMP),
    "88.123.99%2fpump-0001",  # lower-case escape, lower-case prefix
    "88.123.99%2FPUMP-0002",
    "%",
    "%2",
    "%ZZ",
    "%25",
    "%2F",
    "%C3%A9",
    "",
    "x" * 2000,
    "\u00e9\u6c34/",
    "$SYS",
    "88.123.99%2F" + "\U0001f600",
    "%2F%2F%2F",
    "0.NA%2F88.123.99",
    "88.123.99%2FPUMP-0001%00",
]


def _noncharacter(c: str) -> bool:
    o = ord(c)
    return 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


# Mosquitto drops a client that publishes a topic with a control character or a noncharacter ("malformed
# packet"), and paho resends that QoS 1 message on every reconnect: those are kept out of the topics.
key_text = st.sampled_from(KEYS) | st.text(
    alphabet=st.characters(blacklist_characters="/+#", blacklist_categories=("Cs", "Cc")).filter(
        lambda c: not _noncharacter(c)
    ),
    max_size=30,
)


class Client:
    """A paho client (MQTT 3.1.1) on its own network thread; received messages go to a thread-safe queue. A
    client the broker dropped is replaced by a new connection (``refused`` lists the topics that did it)."""

    def __init__(self, url: str, client_id: str, subscribe: list[str] | None = None) -> None:
        from gateway.broker import parse_url

        self.addr = parse_url(url)
        self.client_id = client_id
        self.topics = subscribe or []
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.refused: list[str] = []
        self.client = self._connect()

    def _connect(self) -> paho.Client:
        connected: queue.Queue[bool] = queue.Queue()

        def on_connect(cl: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            if self.topics:
                cl.subscribe([(t, 1) for t in self.topics])
            connected.put(True)

        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311, clean_session=True
        )
        c.on_connect = on_connect
        c.on_message = lambda cl, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        c.connect(self.addr.host, self.addr.port, keepalive=60)
        c.loop_start()
        connected.get(timeout=10)
        time.sleep(0.05)  # the SUBACK
        return c

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Publish (waiting for the PUBACK at QoS 1); False when the broker dropped us for it."""
        ok = True
        try:
            info = self.client.publish(topic, payload, qos=qos, retain=retain)
            if qos:
                info.wait_for_publish(2)
                ok = info.is_published()
        except (RuntimeError, ValueError):
            ok = False
        if not ok or not self.client.is_connected():
            self.refused.append(topic)
            self.close()
            self.client = self._connect()
            return False
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Env:
    def __init__(self, runner: LoopThread, watch: LogWatch, url: str, fe: MqttFrontEnd) -> None:
        self.runner = runner
        self.watch = watch
        self.url = url
        self.fe = fe
        self.fuzzer = Client(url, "fuzzer")
        self.device = Client(
            url,
            devicemsg.topic_key(PUMP)[:23],
            [f"{devicemsg.TOPIC_ROOT}/{devicemsg.topic_key(PUMP)}/{leaf}" for leaf in ("res", "ack")],
        )
        self._tok = itertools.count(1)
        self._seq = itertools.count(1)
        self.published = 0

    def close(self) -> None:
        self.fuzzer.close()
        self.device.close()

    def _wait(
        self, leaf: str, match: Callable[[dict[int, Any]], bool], timeout: float = 10.0
    ) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                topic, payload = self.device.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if topic.rsplit("/", 1)[-1] != leaf:
                continue
            try:
                obj = devicemsg.loads(payload)
            except devicemsg.WireError:
                continue  # the fuzzer's own garbage on the device's topics (a device ignores it too)
            if isinstance(obj, dict) and match(obj):
                return obj
        raise AssertionError(f"no {leaf} answer within {timeout} s")

    def check(self) -> None:
        """A valid resolve and a valid report from the device are answered correctly."""
        base = f"{devicemsg.TOPIC_ROOT}/{devicemsg.topic_key(PUMP)}"
        token = next(self._tok).to_bytes(4, "big")
        self.device.publish(f"{base}/req", devicemsg.encode("resolve_request", {"token": token, "id": PUMP}))
        res = self._wait("res", lambda o: o.get(1) == token)
        assert res.get(3) == devicemsg.OK and res.get(2) == PUMP and [v[0] for v in res[4]] == [1, 2, 3], res
        seq = next(self._seq)
        self.device.publish(
            f"{base}/rpt", devicemsg.encode("report", report_fields(PUMP, boot=7, seq=seq)), qos=1
        )
        ack = self._wait("ack", lambda o: o.get(10) == 7 and o.get(11) == seq)
        assert ack.get(3) == devicemsg.OK, ack

    def assert_clean(self) -> None:
        self.runner.assert_clean()


@pytest.fixture(scope="module")
def mqtt_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (make setup installs it)")
    tmp = tmp_path_factory.mktemp("fuzz-mqtt")
    broker = Broker(tmp / "mosquitto")
    broker.start()
    holder: dict[str, MqttFrontEnd] = {}
    with watch_logs(allow=()) as watch:

        async def setup() -> tuple[int, Callable[[], Awaitable[None]]]:
            registry = Registry(tmp / "registry.sqlite3")
            limiter = RateLimiter(Limits(device_rate=50, device_burst=200))
            fe = MqttFrontEnd(
                broker.url, FakeResolver(), registry, Metrics(), reconnect_max=1, limiter=limiter
            )
            await fe.start()
            assert fe.ready
            holder["fe"] = fe

            async def teardown() -> None:
                await fe.stop()
                registry.close()

            return broker.port, teardown

        runner = LoopThread(watch, setup)
        runner.start()
        env = Env(runner, watch, broker.url, holder["fe"])
        try:
            env.check()
            yield env
        finally:
            env.close()
            runner.stop()
            # retained garbage must not outlive the module
            broker.stop()
        env.assert_clean()


def _payload_for(leaf: str) -> st.SearchStrategy[bytes]:
    name = {"req": "resolve_request", "rpt": "report", "cfgack": "config_ack", "status": "status"}.get(leaf)
    return cbor_payloads(name) | st.just(b"")


@st.composite
def publications(draw: st.DrawFn) -> tuple[str, bytes, int, bool]:
    leaf = draw(st.sampled_from(LEAVES))
    key = draw(key_text)
    topic = (
        f"{devicemsg.TOPIC_ROOT}/{key}/{leaf}"
        if draw(st.integers(0, 9))
        else draw(
            st.sampled_from(
                [
                    f"{devicemsg.TOPIC_ROOT}/{key}/{leaf}/extra",
                    f"ida/v1/d/{key}",
                    "ida/v1/d",
                    f"ida/v1/d/{key}/{leaf}/",
                ]
            )
        )
    )
    return topic, draw(_payload_for(leaf)), draw(st.integers(0, 1)), draw(st.integers(0, 6)) == 0


@fuzz_settings(12)
@given(st.lists(publications(), min_size=1, max_size=15))
def test_fuzz_mqtt_front_end(mqtt_env: Env, pubs: list[tuple[str, bytes, int, bool]]) -> None:
    for topic, payload, qos, retain in pubs:
        mqtt_env.fuzzer.publish(topic, payload, qos, retain)
        mqtt_env.published += 1
    mqtt_env.check()
    mqtt_env.assert_clean()


@fuzz_settings(8)
@given(
    st.lists(
        st.tuples(st.sampled_from(["req", "rpt", "cfgack", "status"]), cbor_payloads()),
        min_size=1,
        max_size=10,
    )
)
def test_fuzz_mqtt_payloads_on_the_device_topics(mqtt_env: Env, pubs: list[tuple[str, bytes]]) -> None:
    """The device's own subtree, every payload shape: the front end answers or drops, never fails."""
    base = f"{devicemsg.TOPIC_ROOT}/{devicemsg.topic_key(PUMP)}"
    for leaf, payload in pubs:
        mqtt_env.fuzzer.publish(f"{base}/{leaf}", payload, qos=1)
    mqtt_env.check()
    mqtt_env.assert_clean()


def test_regression_mqtt_fuzz_smoke(mqtt_env: Env) -> None:
    """Fixed odd inputs every run: bad escapes, another device's id in the payload, retained garbage status."""
    odd = [
        ("ida/v1/d/%ZZ/rpt", devicemsg.encode("report", report_fields(PUMP))),
        ("ida/v1/d/%2/cfgack", b"\xa3\x02\x61x\x14\x01\x03\x01"),
        ("ida/v1/d//req", b"\xa2\x01\x41\x01\x02\x60"),
        (f"ida/v1/d/{devicemsg.topic_key(PUMP)}/status", b"\xff"),
        (f"ida/v1/d/{devicemsg.topic_key(PUMP)}/req", b"\xa2\x01\x41\x01\x02\x78\x1b" + b"\xff" * 27),
        (f"ida/v1/d/{devicemsg.topic_key(PUMP)}/rpt", b"\xa2\x0a\x1b" + b"\xff" * 8 + b"\x0b\x00"),
        (f"ida/v1/d/{devicemsg.topic_key(PUMP)}/req", b"\x81" * 5000 + b"\x00"),
    ]
    for topic, payload in odd:
        mqtt_env.fuzzer.publish(topic, payload, qos=1, retain=topic.endswith("status"))
    mqtt_env.check()
    mqtt_env.assert_clean()
