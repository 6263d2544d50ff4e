"""Edge gateway for industrial identifier resolution (Handle syntax).

Folder map, in the order one resolution travels through it::

    identifier.py   parse and normalise `<prefix>/<suffix>`
    wire.py         device <-> gateway messages (CBOR, small integer keys)
    records.py      Handle records: values, Handle REST JSON form, device CBOR form
    handle/         Handle native protocol (RFC 3652): sans-I/O codec and asyncio client
"""

__version__ = "0.1.0"
