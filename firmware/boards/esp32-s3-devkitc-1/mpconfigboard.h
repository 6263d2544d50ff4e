// ida-edge carrier on boards/esp32-s3-devkitc-1.json: the stock ESP32_GENERIC_S3 board's configuration, unchanged
// (ports/esp32 is on the include path); only the frozen manifest differs (mpconfigboard.cmake).
#include "boards/ESP32_GENERIC_S3/mpconfigboard.h"
