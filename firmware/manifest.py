# mypy: ignore-errors
# MicroPython manifest: freezes the firmware into a MicroPython build, so its bytecode runs in place from flash
# instead of being loaded from .mpy files into the heap (see docs/firmware.md, "Frozen firmware").
#
# Run by MicroPython's tools/makemanifest.py, never on the device. One manifest serves:
#   - an ESP-IDF board build (ports/esp32): firmware/boards/<board>/ sets it, or
#       make BOARD=ESP32_GENERIC FROZEN_MANIFEST=$PWD/firmware/manifest.py
#   - the 32-bit unix interpreter of the tests (third_party/micropython32/build.sh OUT firmware/manifest.py NAME).
# It keeps the port's own manifest (ESP32: _boot.py, inisetup, asyncio, networking...; unix standard variant:
# asyncio, ssl, mip), then freezes the whole `carrier` package and `main.py`: a frozen main.py is what the ESP32
# runs at boot (pyexec_file_if_exists looks in the frozen modules before the filesystem), so the filesystem
# holds only the device's identity, config and board files.


def _include_port_manifest():
    # $(PORT_DIR) is substituted by include(); the port is told apart by which of its manifests exists.
    # include() reports a missing file as an error whose context is the FileNotFoundError; any other error
    # (in the port's manifest itself) is raised as it is.
    for path in ("$(PORT_DIR)/boards/manifest.py", "$(PORT_DIR)/variants/standard/manifest.py"):
        try:
            include(path)
            return
        except Exception as e:
            if not isinstance(e.__context__, FileNotFoundError):
                raise
    raise ValueError("firmware/manifest.py: no port manifest at $(PORT_DIR)/boards or $(PORT_DIR)/variants/standard")


_include_port_manifest()
package("carrier")
module("main.py")
