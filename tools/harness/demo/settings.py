"""The demo's numbers and cast: timings, grace periods, the three devices, the environment variable that marks
every process it starts."""

from __future__ import annotations

PREFIX = "88.123.99"
NODE_LATENCY_MS = 20.0  # added by `ida node` to every answer: upstream is a network round trip away
REPORT_INTERVAL = 20  # s, the devices' report interval (the firmware accepts 10-86400)
STATUS_EVERY = 1.0  # s between `status` questions to each device
STEP = 2.0  # s between two scripted steps
OUTAGE_S = 10.0  # how long VALVE-0001 stays offline
SUMMARY_EVERY = 20.0  # s between gateway summaries once the script has run
START_TIMEOUT = 45.0  # per component; the machine may be busy
DEVICE_STOP_GRACE = 3.0
SERVICE_STOP_GRACE = 10.0
# the whole stop: devices (grace + reader each) and services (grace + SIGKILL wait each) take at most ~60 s
STOP_WATCHDOG_S = 75
DEMO_DIR_ENV = "IDA_DEMO_DIR"  # set in the environment of every process the demo starts

# (identifier, transport, role)
DEVICES: tuple[tuple[str, str, str], ...] = (
    (f"{PREFIX}/PUMP-0001", "coap", "CoAP"),
    (f"{PREFIX}/MOTOR-0001", "mqtt", "MQTT"),
    (f"{PREFIX}/VALVE-0001", "coap", "CoAP, loses its network for a while"),
)
