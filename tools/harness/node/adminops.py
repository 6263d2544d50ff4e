"""What an administration request does to the node's records, and who may ask for it (sans-I/O).

Used by both protocols: the native side (:mod:`tools.harness.node.admin`, after the challenge) and the REST
side (``PUT`` / ``DELETE /api/handles/...`` with HTTP basic auth). The order follows HANDLE.NET 7.3.1's server:

1. :meth:`AdminOps.precheck`, before anyone is authenticated: a handle whose prefix the node does not home is
   RC_SERVER_NOT_RESP (301); a create of a handle that exists (without the overwrite flag) is
   RC_HANDLE_ALREADY_EXIST (101); any other operation on a missing handle is RC_HANDLE_NOT_FOUND (100).
2. :meth:`AdminOps.authorize`: the admin (handle, index) must be named by an ``HS_ADMIN`` value with the
   operation's permission bit -- in the prefix handle ``0.NA/<prefix>`` for a create (ADD_HANDLE), in the
   handle itself otherwise (DELETE_HANDLE, ADD_VALUE, MODIFY_VALUE, REMOVE_VALUE; the *_ADMIN bits when
   ``HS_ADMIN`` values are touched). An admin value with index 0 names every index of its handle. Anyone else
   is RC_INVALID_ADMIN (400), whatever key they hold. (Admin groups, ``HS_VLIST``, are not followed.)
3. The signature is checked by the caller with :meth:`AdminOps.public_keys` (HS_PUBKEY values of the admin).
4. :meth:`AdminOps.apply`: create (indexes must be positive and distinct: 202 / 201), delete, add (an index in
   use: 201 unless overwriting), modify (every index must exist: 200), remove (at least one index must exist:
   200). Values get the node's time as timestamp. Each change calls ``on_change`` (the node saves its store).

:attr:`AdminOps.done` counts successful operations per (operation, handle): the tests read "registered
exactly once" from it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from proto.handle import AdminRequest
from proto.handle.keys import KeyFileError, PublicKey, load_public_key
from proto.handle.numbers import (
    AUTH_PUBKEY,
    AUTH_SECKEY,
    RC_HANDLE_ALREADY_EXIST,
    RC_HANDLE_NOT_FOUND,
    RC_INVALID_HANDLE,
    RC_NOT_AUTHORIZED,
    RC_SERVER_NOT_RESP,
    RC_SUCCESS,
    RC_VALUE_ALREADY_EXIST,
    RC_VALUE_INVALID,
    RC_VALUES_NOT_FOUND,
    AdminPerm,
    OpCode,
)
from proto.records import AdminRef, HandleValue, Record, RecordFormatError, parse_value_ref
from tools.harness.node.store import RecordStore

__all__ = ["AdminOps", "Identity", "OP_NAMES", "Refusal", "install_admin"]

OP_NAMES = {
    int(OpCode.CREATE_HANDLE): "create",
    int(OpCode.DELETE_HANDLE): "delete",
    int(OpCode.ADD_VALUE): "add",
    int(OpCode.REMOVE_VALUE): "remove",
    int(OpCode.MODIFY_VALUE): "modify",
}
_VALUE_PERMS = {
    int(OpCode.ADD_VALUE): (AdminPerm.ADD_VALUE, AdminPerm.ADD_ADMIN),
    int(OpCode.MODIFY_VALUE): (AdminPerm.MODIFY_VALUE, AdminPerm.MODIFY_ADMIN),
    int(OpCode.REMOVE_VALUE): (AdminPerm.REMOVE_VALUE, AdminPerm.REMOVE_ADMIN),
}


@dataclass(frozen=True, slots=True)
class Identity:
    """An administrator: the handle and index of its key (``300:0.NA/88.123.99``)."""

    handle: str
    index: int

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``"300:0.NA/88.123.99"`` (as HANDLE.NET writes an administrator); RecordFormatError otherwise."""
        handle, index = parse_value_ref(text)
        return cls(handle, index)

    def __str__(self) -> str:
        return f"{self.index}:{self.handle}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A response code other than success, and its text."""

    code: int
    text: str = ""


def _prefix(handle: str) -> str:
    return handle.split("/", 1)[0]


def _same(a: str, b: str) -> bool:
    return a.encode().lower() == b.encode().lower()


class AdminOps:
    """Administration of one :class:`RecordStore`; ``clock`` gives the values' timestamps (Unix seconds)."""

    def __init__(
        self,
        store: RecordStore,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_change = on_change
        self.done: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[tuple[str, int]] = Counter()

    # -- before authentication -----------------------------------------------------------------------
    def precheck(self, req: AdminRequest, overwrite: bool = False) -> Refusal | None:
        if not req.handle or "/" not in req.handle:
            return Refusal(int(RC_INVALID_HANDLE), f"not a handle: {req.handle!r}")
        prefix = _prefix(req.handle)
        if not self.store.hosts(prefix) and not (
            prefix.upper() == "0.NA" and self.store.hosts(req.handle[5:])
        ):
            return Refusal(int(RC_SERVER_NOT_RESP), f"server not responsible for prefix {prefix}")
        exists = req.handle in self.store
        if req.opcode == OpCode.CREATE_HANDLE:
            if exists and not overwrite:
                return Refusal(int(RC_HANDLE_ALREADY_EXIST), f"{req.handle} already exists")
        elif not exists:
            return Refusal(int(RC_HANDLE_NOT_FOUND), f"{req.handle} not found")
        return None

    # -- who may ---------------------------------------------------------------------------------------
    def _admins(self, handle: str) -> list[tuple[AdminRef, int]]:
        rec = self.store.get(handle)
        out = []
        for v in rec.values if rec else ():
            if v.type.upper() == "HS_ADMIN":
                try:
                    ref = AdminRef.decode(v.data)
                except RecordFormatError:
                    continue
                out.append((ref, ref.permissions))
        return out

    def _names(self, handle: str, who: Identity, need: int) -> bool:
        return any(
            _same(ref.handle, who.handle) and ref.index in (0, who.index) and perms & need == need
            for ref, perms in self._admins(handle)
        )

    def authorize(self, req: AdminRequest, who: Identity, overwrite: bool = False) -> Refusal | None:
        if req.opcode == OpCode.CREATE_HANDLE:
            prefix_handle = f"0.NA/{_prefix(req.handle)}"
            ok = self._names(prefix_handle, who, AdminPerm.ADD_HANDLE)
            if not ok and overwrite and req.handle in self.store:
                ok = self._names(req.handle, who, AdminPerm.ADD_VALUE | AdminPerm.REMOVE_VALUE)
            where = prefix_handle
        elif req.opcode == OpCode.DELETE_HANDLE:
            ok, where = self._names(req.handle, who, AdminPerm.DELETE_HANDLE), req.handle
        else:
            plain, admin = _VALUE_PERMS[req.opcode]
            rec = self.store.get(req.handle)
            touched = {v.index for v in req.values} | set(req.indexes)
            admin_touched = any(v.type.upper() == "HS_ADMIN" for v in req.values) or any(
                v.type.upper() == "HS_ADMIN" and v.index in touched for v in (rec.values if rec else ())
            )
            ok = self._names(req.handle, who, plain | (admin if admin_touched else 0))
            where = req.handle
        if ok:
            return None
        op = OP_NAMES[req.opcode]
        return Refusal(int(RC_NOT_AUTHORIZED), f"{who} is not an administrator of {where} allowed to {op}")

    def public_keys(self, who: Identity) -> list[PublicKey]:
        """The HS_PUBKEY values of the admin (index 0: every HS_PUBKEY of its handle) that parse."""
        return [k for k in (self._key(v) for v in self._values(who, AUTH_PUBKEY)) if k is not None]

    def secret_key(self, who: Identity) -> bytes | None:
        """The admin's HS_SECKEY (REST basic authentication), None when there is none."""
        found = self._values(who, AUTH_SECKEY)
        return found[0].data if found else None

    def _values(self, who: Identity, vtype: str) -> list[HandleValue]:
        rec = self.store.get(who.handle)
        return [v for v in (rec.values if rec else ()) if v.type == vtype and who.index in (0, v.index)]

    @staticmethod
    def _key(v: HandleValue) -> PublicKey | None:
        try:
            return load_public_key(v.data)
        except KeyFileError:
            return None

    # -- doing it --------------------------------------------------------------------------------------
    def apply(self, req: AdminRequest, overwrite: bool = False) -> Refusal | None:
        """Carry out an authorized request; a Refusal when its values do not fit (None = done)."""
        now = int(self.clock())
        stamped = tuple(replace(v, timestamp=now) for v in req.values)
        rec = self.store.get(req.handle)
        have = {v.index: v for v in rec.values} if rec else {}
        if req.opcode == OpCode.CREATE_HANDLE:
            bad = self._check_new(stamped)
            if bad:
                return bad
            self.store.add(Record(req.handle, stamped))
        elif req.opcode == OpCode.DELETE_HANDLE:
            self.store.remove(req.handle)
        elif req.opcode == OpCode.ADD_VALUE:
            bad = self._check_new(stamped)
            if bad:
                return bad
            clash = [v.index for v in stamped if v.index in have]
            if clash and not overwrite:
                return Refusal(int(RC_VALUE_ALREADY_EXIST), f"index {clash[0]} is in use")
            have.update({v.index: v for v in stamped})
        elif req.opcode == OpCode.MODIFY_VALUE:
            missing = [v.index for v in stamped if v.index not in have]
            if missing:
                return Refusal(int(RC_VALUES_NOT_FOUND), f"no value at index {missing[0]}")
            have.update({v.index: v for v in stamped})
        else:  # remove
            if not any(i in have for i in req.indexes):
                return Refusal(int(RC_VALUES_NOT_FOUND), "no value at the given indexes")
            for i in req.indexes:
                have.pop(i, None)
        if req.opcode in _VALUE_PERMS:
            self.store.add(Record(req.handle, tuple(sorted(have.values(), key=lambda v: v.index))))
        self.done[(OP_NAMES[req.opcode], req.handle)] += 1
        if self.on_change is not None:
            self.on_change()
        return None

    @staticmethod
    def _check_new(values: tuple[HandleValue, ...]) -> Refusal | None:
        seen: set[int] = set()
        for v in values:
            if v.index <= 0 or v.index > 0x7FFFFFFF:
                return Refusal(int(RC_VALUE_INVALID), f"index {v.index} is not positive")
            if v.index in seen:
                return Refusal(int(RC_VALUE_ALREADY_EXIST), f"index {v.index} is given twice")
            seen.add(v.index)
        return None

    def summary(self) -> str:
        """``create=200/200 modify=3/3``: operations done / distinct handles, per operation."""
        per: dict[str, tuple[int, int]] = {}
        for (op, _handle), n in self.done.items():
            total, handles = per.get(op, (0, 0))
            per[op] = (total + n, handles + 1)
        return " ".join(f"{op}={t}/{h}" for op, (t, h) in sorted(per.items())) or "-"

    def count(self, op: str, code: int) -> None:
        """Count a refusal (``refused[(op, code)]``)."""
        if code != RC_SUCCESS:
            self.refused[(op, code)] += 1


def install_admin(store: RecordStore, who: Identity, vtype: str, data: bytes) -> Record:
    """Make ``who`` an administrator of the prefix its handle is the prefix handle of (``0.NA/<prefix>``): its
    key (``HS_PUBKEY``, or ``HS_SECKEY`` for REST basic authentication) at ``who.index``, and an ``HS_ADMIN``
    value with every permission naming it (at 100, or the next free index). ValueError for a handle that is
    not a prefix handle or an index already used by another value."""
    if who.handle[:5].upper() != "0.NA/" or len(who.handle) <= 5 or who.index <= 0:
        raise ValueError(f"{who}: an admin key lives in a prefix handle, e.g. 300:0.NA/88.123.99")
    rec = store.get(who.handle)
    values = {v.index: v for v in (rec.values if rec else ())}
    old = values.get(who.index)
    if old is not None and (old.type, old.data) != (vtype, data):
        raise ValueError(f"{who}: index {who.index} already holds a {old.type} value")
    now = int(time.time())
    perms = 0x0C if vtype == AUTH_SECKEY else 0x0E  # a secret key is never publicly readable
    values[who.index] = HandleValue(who.index, vtype, data, timestamp=now, permissions=perms)
    named = AdminRef(who.handle, who.index, int(AdminPerm.ALL))
    admins = [v for v in values.values() if v.type == "HS_ADMIN" and v.data == named.encode()]
    if not admins:
        free = next(i for i in range(100, 0x7FFFFFFF) if i not in values)
        values[free] = HandleValue(free, "HS_ADMIN", named.encode(), timestamp=now)
    return store.add(Record(who.handle, tuple(sorted(values.values(), key=lambda v: v.index))))
