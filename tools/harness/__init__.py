"""The development harness: what tests, benchmarks and demonstrations run against the real code.

* ``node/`` -- ``ida node``: a local recursive Handle node (native protocol and REST) with fault knobs.
* ``sim/`` -- ``ida sim``: a fleet of devices, real firmware processes or a protocol-level simulator.
* ``bench/`` -- ``ida bench``: the benchmark suite, P1-P5 against anchors measured in the same run.
* ``demo/`` -- ``ida demo`` (``make demo``): the whole system on loopback, narrated.
* ``fwcheck`` -- ``make firmware-check``: the firmware type-checked against the MicroPython stubs.
"""
