"""Handle System native protocol (RFC 3652) as spoken by deployed HANDLE.NET servers.

``numbers`` holds the opcodes, response codes, flag bits and size limits; ``codec`` turns messages into
bytes and back without any I/O (client and server side, UDP datagram splitting and reassembly, TCP
framing); ``client`` is the asyncio transport (UDP first, TCP fallback) that the upstream pool uses.
"""
