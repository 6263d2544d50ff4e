"""`ida node`: a local recursive Handle node for tests, benchmarks and the demo (library first).

:class:`NodeServer` serves records (:class:`RecordStore`; the built-in sample set by default) over the
Handle native protocol (UDP and TCP on one port) and the Handle REST API, with fault knobs (:class:`Knobs`).

Modules: ``server`` (NodeServer: records, silence, lifecycle, the REST gate), ``listener`` (the native side
on the network: UDP with request reassembly, TCP), ``native`` (sans-I/O: request bytes in, answer bytes out,
on :mod:`proto.handle`), ``admin`` (sans-I/O: sessions, challenges and administration requests of the native
protocol), ``adminops`` (what an administration request does to the records, and who may ask: ``HS_ADMIN``),
``rest`` (the REST API), ``restadmin`` (REST ``PUT`` / ``DELETE``), ``store`` (records, lookups, the sample set
in ``sample_records.json``, the ``--store`` file), ``faults`` (the knobs: latency, failures, truncation),
``stats`` (counters), ``address`` (HOST:PORT), ``cli`` (``ida node``, the command-line wrapper).
"""

from tools.harness.node.address import NodeError, format_hostport, parse_hostport
from tools.harness.node.faults import Fault, Knobs
from tools.harness.node.server import NodeServer
from tools.harness.node.stats import NodeStats
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
