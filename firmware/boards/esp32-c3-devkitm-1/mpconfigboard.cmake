# ida-edge carrier for boards/esp32-c3-devkitm-1.json: MicroPython's stock ESP32_GENERIC_C3 board with the firmware frozen in.
# Build from MicroPython's ports/esp32 (ESP-IDF set up; see docs/firmware.md, "Frozen firmware"):
#   make BOARD_DIR=<ida-edge>/firmware/boards/esp32-c3-devkitm-1
# Paths are MicroPython's own: relative to ports/esp32, as the stock boards include each other.
include(boards/ESP32_GENERIC_C3/mpconfigboard.cmake)

set(MICROPY_FROZEN_MANIFEST ${MICROPY_BOARD_DIR}/../../manifest.py)
