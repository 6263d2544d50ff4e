"""`ida node`: a local recursive Handle node for tests, benchmarks and the demo (library first).

:class:`NodeServer` serves records (:class:`RecordStore`; the built-in sample set by default) over the
Handle native protocol (UDP and TCP on one port) and the Handle REST API, with fault knobs (:class:`Knobs`).
``tools.harness.node.cli`` is the command-line wrapper.

Modules: ``server`` (``NodeServer``: sockets, counters), ``native`` (the Handle native protocol side), ``rest``
(the Handle REST API side), ``store`` (records, lookups, the sample set in ``sample_records.json``), ``faults``
(latency, failures, truncation), ``cli`` (``ida node``).
"""

from tools.harness.node.faults import Fault, Knobs
from tools.harness.node.server import NodeError, NodeServer, NodeStats, format_hostport, parse_hostport
from tools.harness.node.store import (
    Lookup,
    RecordsError,
    RecordStore,
    load_records,
    parse_records,
    sample_records,
)

__all__ = [
    "Fault",
    "Knobs",
    "Lookup",
    "NodeError",
    "NodeServer",
    "NodeStats",
    "RecordStore",
    "RecordsError",
    "format_hostport",
    "load_records",
    "parse_hostport",
    "parse_records",
    "sample_records",
]
