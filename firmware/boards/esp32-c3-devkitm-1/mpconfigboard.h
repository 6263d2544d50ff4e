// ida-edge carrier on boards/esp32-c3-devkitm-1.json: the stock ESP32_GENERIC_C3 board's configuration, unchanged
// (ports/esp32 is on the include path); only the frozen manifest differs (mpconfigboard.cmake).
#include "boards/ESP32_GENERIC_C3/mpconfigboard.h"
