// ida-edge carrier on boards/esp32-devkitc.json: the stock ESP32_GENERIC board's configuration, unchanged
// (ports/esp32 is on the include path); only the frozen manifest differs (mpconfigboard.cmake).
#include "boards/ESP32_GENERIC/mpconfigboard.h"
