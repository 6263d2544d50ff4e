# The board file (boards/<name>.json, copied to the device as board.json) as a Board record: name, chip, status
# LED, button, console kind, Wi-Fi. Read once, by the HAL's constructor; boot drops this module again
# (carrier.unload), so the device keeps the record, not the parser.
import sys


class Board:
    """A record without methods (it must not keep this module in the heap): name, chip, led ((kind, pin,
    active_high) or None), button ((pin, active_low) or None), console ("stdio", "uart"...), wifi (bool). The
    annotations cost nothing on the device."""

    name: str
    chip: str
    led: "tuple | None"
    button: "tuple | None"
    console: str
    wifi: bool


def load(path):
    """The Board of the JSON file at path; defaults (this platform, no LED, no button, stdio) when absent or
    unreadable."""
    import json
    try:
        with open(path) as f:
            d = json.load(f)
        if type(d) is not dict:
            d = {}
    except (OSError, ValueError):
        d = {}
    b = Board()
    b.name = d.get("name") or sys.platform
    b.chip = d.get("chip") or sys.platform
    led = d.get("status_led")
    b.led = (led["kind"], led["pin"], led.get("active") != "low") if led else None
    btn = d.get("button")
    b.button = (btn["pin"], btn.get("active") != "high") if btn else None  # (pin, active_low)
    c = d.get("console") or {}
    b.console = c.get("kind") or "stdio"
    b.wifi = bool((d.get("features") or {}).get("wifi"))
    return b
