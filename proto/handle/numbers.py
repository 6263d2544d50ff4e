"""Numbers of the Handle native protocol: opcodes, response codes, flag bits, ports and size limits.

The only place these values live. Names follow RFC 3652 section 2.2.2; where the HANDLE.NET
implementation (``net.handle.hdllib.AbstractMessage``) renamed or added a code, the CNRI name is an
alias of the same member (``ResponseCode.SERVER_TOO_BUSY is ResponseCode.SERVER_BUSY``).
Module-level ``OC_*``, ``RC_*``, ``OPF_*`` and ``ENV_*`` aliases are kept for terse use and static checkers.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class OpCode(IntEnum):
    """Header ``OpCode`` (RFC 3652 section 2.2.2.1)."""

    RESERVED = 0
    RESOLUTION = 1
    GET_SITEINFO = 2
    CREATE_HANDLE = 100
    DELETE_HANDLE = 101
    ADD_VALUE = 102
    REMOVE_VALUE = 103
    MODIFY_VALUE = 104
    LIST_HANDLE = 105
    LIST_NA = 106
    CHALLENGE_RESPONSE = 200
    VERIFY_RESPONSE = 201
    HOME_NA = 300
    UNHOME_NA = 301
    LIST_HOMED_NA = 302
    SESSION_SETUP = 400
    SESSION_TERMINATE = 401
    SESSION_EXCHANGEKEY = 402
    GET_NEXT_TXN_ID = 1000
    RETRIEVE_TXN_LOG = 1001
    DUMP_HANDLES = 1002
    BACKUP_SERVER = 1003
    # IDIS (industrial internet identifier resolution) login, per DESIGN.md; not seen in any capture yet.
    IDIS_LOGIN = 2001


class ResponseCode(IntEnum):
    """Header ``ResponseCode`` (RFC 3652 section 2.2.2.2); 0 marks a request."""

    RESERVED = 0
    SUCCESS = 1
    ERROR = 2
    SERVER_BUSY = 3
    PROTOCOL_ERROR = 4
    OPERATION_DENIED = 5
    RECUR_LIMIT_EXCEEDED = 6
    SERVER_BACKUP = 7  # HANDLE.NET only
    HANDLE_NOT_FOUND = 100
    HANDLE_ALREADY_EXIST = 101
    INVALID_HANDLE = 102
    VALUES_NOT_FOUND = 200
    VALUE_ALREADY_EXIST = 201
    VALUE_INVALID = 202
    EXPIRED_SITE_INFO = 300
    SERVER_NOT_RESP = 301
    SERVICE_REFERRAL = 302
    PREFIX_REFERRAL = 303
    NOT_AUTHORIZED = 400
    ACCESS_DENIED = 401
    AUTHEN_NEEDED = 402
    AUTHEN_FAILED = 403
    INVALID_CREDENTIAL = 404
    AUTHEN_TIMEOUT = 405
    UNABLE_TO_AUTHEN = 406
    SESSION_TIMEOUT = 500
    SESSION_FAILED = 501
    NO_SESSION_KEY = 502
    SESSION_NO_SUPPORT = 503
    SESSION_KEY_INVALID = 504
    SESSION_MESSAGE_REJECTED = 505  # HANDLE.NET only
    TRYING = 900
    FORWARDED = 901
    QUEUED = 902

    # HANDLE.NET (CNRI) names of the same codes
    SERVER_TOO_BUSY = 3
    OPERATION_NOT_SUPPORTED = 5
    RECURSION_COUNT_TOO_HIGH = 6
    VALUE_NOT_FOUND = 200
    OUT_OF_DATE_SITE_INFO = 300
    NA_DELEGATE = 303  # the RFC 3652 name of 303
    INVALID_ADMIN = 400
    INSUFFICIENT_PERMISSIONS = 401
    AUTHENTICATION_NEEDED = 402
    AUTHENTICATION_FAILED = 403
    AUTHEN_ERROR = 406
    INVALID_SESSION_KEY = 502
    NEED_RSAKEY_FOR_SESSIONEXCHANGE = 503
    INVALID_SESSIONSETUP_REQUEST = 504

    @classmethod
    def describe(cls, code: int) -> str:
        """``"HANDLE_NOT_FOUND (100)"`` for a known code, ``"unknown (777)"`` otherwise."""
        try:
            return f"{cls(code).name} ({code})"
        except ValueError:
            return f"unknown ({code})"

    @staticmethod
    def is_referral(code: int) -> bool:
        return code in (ResponseCode.SERVICE_REFERRAL, ResponseCode.PREFIX_REFERRAL)

    @staticmethod
    def is_not_found(code: int) -> bool:
        """Codes that are an answer ("no such handle / values"), not a failure of the node."""
        return code in (ResponseCode.HANDLE_NOT_FOUND, ResponseCode.VALUES_NOT_FOUND)


class OpFlag(IntFlag):
    """Header ``OpFlag`` bits (RFC 3652 section 2.2.2.3); bit 31 is the most significant."""

    AT = 1 << 31  # authoritative: ask for / answer from a primary
    CT = 1 << 30  # certified: ask the server to sign the response
    ENC = 1 << 29  # encrypt the response with the session key
    REC = 1 << 28  # recursive
    CA = 1 << 27  # cache authentication
    CN = 1 << 26  # continuous: more messages of this request/response follow
    KC = 1 << 25  # keep the TCP connection open
    PO = 1 << 24  # public values only
    RD = 1 << 23  # response carries a digest of the request
    # HANDLE.NET additions (not in RFC 3652)
    OVRW = 1 << 22  # overwrite when exists (admin)
    MINT = 1 << 21  # mint a new suffix (create)
    DNRF = 1 << 20  # do not send a referral


class EnvFlag(IntFlag):
    """Bits of the 16-bit envelope ``MessageFlag`` (RFC 3652 section 2.2.1)."""

    CP = 0x8000  # compressed
    EC = 0x4000  # encrypted
    TC = 0x2000  # truncated (HANDLE.NET: also set on requests split into several datagrams)


# Low bits of MessageFlag: HANDLE.NET puts the protocol version it would rather speak there.
ENV_SUGGEST_MAJOR_MASK = 0x0300
ENV_SUGGEST_MINOR_MASK = 0x00FF

# Hash types of a request digest (first body byte of a response with the RD flag), also the one-byte hash
# names of an HS_MAC credential before protocol 2.6.
DIGEST_MD5_OLD_FORMAT = 0  # then a length-prefixed byte string
DIGEST_MD5 = 1
DIGEST_SHA1 = 2
DIGEST_SHA256 = 3
DIGEST_HMAC_SHA1 = 0x12
DIGEST_HMAC_SHA256 = 0x13
DIGEST_SIZES = {DIGEST_MD5: 16, DIGEST_SHA1: 20, DIGEST_SHA256: 32}


class AdminPerm(IntFlag):
    """The 12 permission bits of an ``HS_ADMIN`` value (HANDLE.NET ``Encoder.PERM_*``)."""

    ADD_HANDLE = 0x0001
    DELETE_HANDLE = 0x0002
    ADD_DERIVED_PREFIX = 0x0004
    DELETE_DERIVED_PREFIX = 0x0008
    MODIFY_VALUE = 0x0010
    REMOVE_VALUE = 0x0020
    ADD_VALUE = 0x0040
    MODIFY_ADMIN = 0x0080
    REMOVE_ADMIN = 0x0100
    ADD_ADMIN = 0x0200
    READ_VALUE = 0x0400
    LIST_HANDLES = 0x0800
    ALL = 0x0FFF


# -- authentication and sessions (RFC 3652 sections 3.5 and 3.6, as HANDLE.NET lays them out) -------------
AUTH_PUBKEY = "HS_PUBKEY"  # challenge answered with a signature (value type of the admin's public key)
AUTH_SECKEY = "HS_SECKEY"  # challenge answered with a keyed digest (value type of a secret key)
CRED_SIGNED = "HS_SIGNED"  # credential: a signature by a key pair
CRED_MAC = "HS_MAC"  # credential: a MAC under the session key
CHALLENGE_NONCE_SIZE = 16
HASH_SHA1 = b"SHA1"  # the hash name in a signature section (HANDLE.NET ``Common.HASH_ALG_SHA1``)
HASH_SHA256 = b"SHA-256"

# SESSION_SETUP key exchange modes (``Common.KEY_EXCHANGE_*``)
KEY_EXCHANGE_NONE = 0
KEY_EXCHANGE_CIPHER_CLIENT = 1
KEY_EXCHANGE_CIPHER_SERVER = 2
KEY_EXCHANGE_CIPHER_HDL = 3
KEY_EXCHANGE_DH = 4
# the session key's cipher, first 4 bytes of a DH session setup answer (``HdlSecurityProvider.ENCRYPT_ALG_*``)
SESSION_ALG_DES = 1
SESSION_ALG_DESEDE = 2
SESSION_ALG_AES = 3
DEFAULT_SESSION_TIMEOUT = 86400  # seconds, as hdl-create asks

# -- transport -----------------------------------------------------------------------------------------
DEFAULT_PORT = 2641
PROTOCOL_MAJOR = 2
PROTOCOL_MINOR = 5  # what hdl-qresolver 7.3.1 sends
SESSION_NONE = 0
SITE_INFO_SERIAL_UNKNOWN = 0xFFFF  # a client without site info sends this
DEFAULT_EXPIRATION = 43200  # seconds a request stays valid (HANDLE.NET default: 12 h)

ENVELOPE_SIZE = 20
HEADER_SIZE = 24
CREDENTIAL_LENGTH_SIZE = 4
MAX_UDP_DATAGRAM = 512  # envelope + message piece, as HANDLE.NET sends
MAX_UDP_PAYLOAD = MAX_UDP_DATAGRAM - ENVELOPE_SIZE  # 492 message bytes per datagram

# -- defensive parsing caps ----------------------------------------------------------------------------
MAX_MESSAGE_SIZE = 1 << 20  # one message (header + body + credential), any transport
MAX_UDP_MESSAGE_SIZE = 256 << 10  # reassembled from datagrams (HANDLE.NET: 262144)
MAX_VALUES = 10_000  # values in one response
MAX_LIST = 10_000  # entries of an index, type or reference list
MAX_FIELD_SIZE = 64 << 10  # one length-prefixed field (handle, type, data, message, ...)

# -- aliases ---------------------------------------------------------------------------------------------
OC_RESERVED = OpCode.RESERVED
OC_RESOLUTION = OpCode.RESOLUTION
OC_GET_SITEINFO = OpCode.GET_SITEINFO
OC_CHALLENGE_RESPONSE = OpCode.CHALLENGE_RESPONSE
OC_VERIFY_RESPONSE = OpCode.VERIFY_RESPONSE
OC_SESSION_SETUP = OpCode.SESSION_SETUP
OC_CREATE_HANDLE = OpCode.CREATE_HANDLE
OC_DELETE_HANDLE = OpCode.DELETE_HANDLE
OC_ADD_VALUE = OpCode.ADD_VALUE
OC_REMOVE_VALUE = OpCode.REMOVE_VALUE
OC_MODIFY_VALUE = OpCode.MODIFY_VALUE
OC_IDIS_LOGIN = OpCode.IDIS_LOGIN

RC_RESERVED = ResponseCode.RESERVED
RC_SUCCESS = ResponseCode.SUCCESS
RC_ERROR = ResponseCode.ERROR
RC_SERVER_BUSY = ResponseCode.SERVER_BUSY
RC_PROTOCOL_ERROR = ResponseCode.PROTOCOL_ERROR
RC_OPERATION_DENIED = ResponseCode.OPERATION_DENIED
RC_RECUR_LIMIT_EXCEEDED = ResponseCode.RECUR_LIMIT_EXCEEDED
RC_HANDLE_NOT_FOUND = ResponseCode.HANDLE_NOT_FOUND
RC_INVALID_HANDLE = ResponseCode.INVALID_HANDLE
RC_VALUES_NOT_FOUND = ResponseCode.VALUES_NOT_FOUND
RC_EXPIRED_SITE_INFO = ResponseCode.EXPIRED_SITE_INFO
RC_SERVER_NOT_RESP = ResponseCode.SERVER_NOT_RESP
RC_SERVICE_REFERRAL = ResponseCode.SERVICE_REFERRAL
RC_PREFIX_REFERRAL = ResponseCode.PREFIX_REFERRAL
RC_NOT_AUTHORIZED = ResponseCode.NOT_AUTHORIZED
RC_ACCESS_DENIED = ResponseCode.ACCESS_DENIED
RC_AUTHEN_NEEDED = ResponseCode.AUTHEN_NEEDED
RC_AUTHEN_FAILED = ResponseCode.AUTHEN_FAILED
RC_INVALID_CREDENTIAL = ResponseCode.INVALID_CREDENTIAL
RC_AUTHEN_TIMEOUT = ResponseCode.AUTHEN_TIMEOUT
RC_UNABLE_TO_AUTHEN = ResponseCode.UNABLE_TO_AUTHEN
RC_HANDLE_ALREADY_EXIST = ResponseCode.HANDLE_ALREADY_EXIST
RC_VALUE_ALREADY_EXIST = ResponseCode.VALUE_ALREADY_EXIST
RC_VALUE_INVALID = ResponseCode.VALUE_INVALID
RC_SESSION_TIMEOUT = ResponseCode.SESSION_TIMEOUT
RC_SESSION_FAILED = ResponseCode.SESSION_FAILED
RC_SESSION_KEY_INVALID = ResponseCode.NO_SESSION_KEY

OPF_AT = OpFlag.AT
OPF_CT = OpFlag.CT
OPF_ENC = OpFlag.ENC
OPF_REC = OpFlag.REC
OPF_CA = OpFlag.CA
OPF_CN = OpFlag.CN
OPF_KC = OpFlag.KC
OPF_PO = OpFlag.PO
OPF_RD = OpFlag.RD

ENV_CP = EnvFlag.CP
ENV_EC = EnvFlag.EC
ENV_TC = EnvFlag.TC

# What hdl-qresolver sends (0x19000000) and what a HANDLE.NET primary answers with it (0x99000000).
DEFAULT_REQUEST_FLAGS = OpFlag.REC | OpFlag.CA | OpFlag.PO
# What hdl-create sends with SESSION_SETUP (0x59800000): certified, with a request digest in the answer.
SESSION_SETUP_FLAGS = OpFlag.CT | OpFlag.REC | OpFlag.CA | OpFlag.PO | OpFlag.RD
