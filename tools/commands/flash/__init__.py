"""Factory flashing and provisioning (``ida flash``), library first; ``tools/commands/flash/cli.py`` is a thin layer.

Per batch, :func:`build` compiles the firmware (mpy-cross) and builds the board's LittleFS image once. Per
chip, :func:`flash_device` detects the chip through a :class:`Programmer` (esptool, or a simulated chip), binds
an identifier to its MAC in the :class:`Ledger`, adds ``/identity.json`` (:class:`Identity`, ``"secure": true``,
a new key in the :class:`Keystore` whenever the chip's filesystem is written) to the batch image, writes only the
blocks that differ, verifies, resets and registers the device in the gateway's local zone -- and, when the station
registers upstream, queues its registration at the enterprise's Handle node (:class:`UpstreamConfig`,
:class:`Registrar`). :func:`run_batch` does that for every chip that appears. See docs/flashing.md.

Modules: ``builder`` (the batch build), ``image`` (LittleFS images), ``identity`` (the identity file and the
per-chip image), ``keystore``, ``ledger``, ``ca`` (the broker CA on the image), ``programmer`` (esptool or a
simulated chip), ``provision`` (one chip), ``batch`` (every chip that appears), ``register`` (the device in the
gateway's local zone), ``registrar`` (the upstream registration: station configuration, the registrar, its
background thread), ``regqueue`` (the registration queue in the ledger), ``regcli`` (``ida flash register``,
``ida flash ledger show``), ``errors``, ``cli`` (``ida flash``).
"""

from __future__ import annotations

from .batch import Summary, espressif_ports, run_batch
from .builder import Build, Manifest, RuntimeInfo, build, inspect_runtime, load_build
from .ca import CaCert, load_ca
from .errors import (
    BuildError,
    CaError,
    ConsoleTimeout,
    FlashError,
    FlashTooSmall,
    IdentifierConflict,
    LedgerError,
    NoChip,
    PoolExhausted,
    PortBusy,
    PortError,
    PortMissing,
    RuntimeMissing,
    VerifyFailed,
    WriteFailed,
    WrongChip,
)
from .identity import ChipImage, Identity, key_fingerprint, parse_identity, personalise
from .image import LfsParams, lfs_params
from .keystore import Keystore
from .ledger import Allocation, Checksums, Device, Ledger, file_identifiers, pattern_identifiers
from .programmer import ChipInfo, EsptoolProgrammer, Programmer, SimulatedChip
from .provision import IdentityTemplate, Result, Station, Write, flash_device, wait_console
from .register import Registration, register_device
from .registrar import Registrar, UpstreamConfig
from .regqueue import RegistrationQueue

__all__ = [
    "Allocation",
    "Build",
    "BuildError",
    "CaCert",
    "CaError",
    "Checksums",
    "ChipImage",
    "ChipInfo",
    "ConsoleTimeout",
    "Device",
    "EsptoolProgrammer",
    "FlashError",
    "FlashTooSmall",
    "IdentifierConflict",
    "Identity",
    "IdentityTemplate",
    "Keystore",
    "Ledger",
    "LedgerError",
    "LfsParams",
    "Manifest",
    "NoChip",
    "PoolExhausted",
    "PortBusy",
    "PortError",
    "PortMissing",
    "Programmer",
    "Registrar",
    "Registration",
    "RegistrationQueue",
    "Result",
    "RuntimeInfo",
    "RuntimeMissing",
    "SimulatedChip",
    "Station",
    "Summary",
    "UpstreamConfig",
    "VerifyFailed",
    "Write",
    "WriteFailed",
    "WrongChip",
    "build",
    "espressif_ports",
    "file_identifiers",
    "flash_device",
    "inspect_runtime",
    "key_fingerprint",
    "lfs_params",
    "load_build",
    "load_ca",
    "parse_identity",
    "pattern_identifiers",
    "personalise",
    "register_device",
    "run_batch",
    "wait_console",
]
