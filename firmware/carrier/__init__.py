# Active identifier carrier firmware (MicroPython). See docs/protocol.md for the wire format.
VERSION = "0.1.0"
