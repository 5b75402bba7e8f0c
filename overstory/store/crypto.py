"""Encryption at rest: message bodies sealed with AES-256-GCM.

Keys come from the environment of every process that opens the store:

* ``OVERSTORY_DATA_KEYS=ID:BASE64[,ID:BASE64...]`` — 32-byte keys in standard or URL-safe
  base64, or
* ``OVERSTORY_DATA_KEY_FILE=PATH`` — a file with the same ``ID:BASE64`` entries, one per
  line or comma-separated (``#`` starts a comment): on a cluster, put the file on every
  node and only its path travels.

The first key seals; every key listed opens. AES-256-GCM, a random 12-byte nonce per
record, a 16-byte tag; the associated data is the key id, the record's position (a
message's seq) and its owner (the conversation id), so a record copied to another
conversation or another position does not open (:class:`~overstory.exceptions.DataKeyError`,
never a wrong message). Two forms:

* ``enc2`` — **bytes**, what message bodies are stored as (:meth:`DataKeys.seal_bytes`):
  ``b"enc2:" + <key id, ASCII> + b":" + nonce (12) + ciphertext + tag (16)``. The key id
  holds no ``:``, so the first ``:`` after the prefix ends it; what follows is raw. A
  SQLite ``body`` column keeps it as a BLOB, MongoDB as BSON binary (subtype 0). No
  base64: it made each row a third larger and cost several µs a body sealed and opened
  (``bench/encryption.py``).
* ``enc1`` — **text**, ``enc1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>``
  (:meth:`DataKeys.seal`): what records kept inside text stay (vault documents, job
  texts, cache entries, summaries — settings and text columns), and what message bodies
  were before ``enc2``. Those still open; ``rotate-data`` turns them into ``enc2``.

A plain (unsealed) message body is JSON text, never bytes: every bytes body is a sealed
record, and one that is not a well-formed ``enc2`` fails to open with a
:class:`~overstory.exceptions.DataKeyError` naming the message. Bodies stored before
encryption was turned on (plain JSON) are read as they are; ``overstory keys
rotate-data`` seals them, and re-seals those under an older key (or in ``enc1``), with
the first key.

Each store keeps one check value per key id it has seen (a setting): opening a store
whose records need a key that is not configured, or with a key that does not open its
check value (a wrong key under a known id), fails at once with a message naming the key
id — never garbage history later.

This module seals and opens; it knows no record but its check values. Each module that
keeps sealed records (the store's messages, the DataVault, background jobs) registers a
*re-sealer* for them at import (:func:`register_resealer`); :func:`reseal` — ``overstory
keys rotate-data``, which imports those owners — runs every registered one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..exceptions import DataKeyError
from .settings import DATA_KEYS, Backoff, SettingContended, SettingsStore, update

__all__ = [
    "CHECKS_SETTING",
    "KEYS_ENV",
    "KEY_FILE_ENV",
    "SEALED_BYTES_PREFIX",
    "SEALED_PREFIX",
    "DataKeys",
    "Resealer",
    "SealedStore",
    "is_sealed",
    "key_id_of",
    "register_resealer",
    "reseal",
    "reseal_settings",
    "resealers",
    "verify_checks",
]

KEYS_ENV = "OVERSTORY_DATA_KEYS"
KEY_FILE_ENV = "OVERSTORY_DATA_KEY_FILE"
SEALED_PREFIX = "enc1:"
#: How a sealed message body (bytes) starts: ``enc2:<key id>:`` then nonce, ciphertext, tag.
SEALED_BYTES_PREFIX = b"enc2:"
#: The store setting holding one check value per key id that ever sealed here.
CHECKS_SETTING = DATA_KEYS.name
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_NONCE = 12
_TAG = 16
_ENC2 = re.compile(re.escape(SEALED_BYTES_PREFIX) + rb"([A-Za-z0-9_.-]{1,32}):")
_CHECK_TEXT = b"overstory data key check"


def is_sealed(body: str | bytes) -> bool:
    """Whether ``body`` is sealed: ``enc1`` text, or bytes (plain bodies are text, so any
    bytes are a sealed record — an ill-formed one fails to open, never reads as plain)."""
    return isinstance(body, bytes) or body.startswith(SEALED_PREFIX)


def key_id_of(body: str | bytes) -> str | None:
    """The key id a sealed body names (``None``: a plain body, or bytes that are not a
    well-formed ``enc2`` record)."""
    if isinstance(body, bytes):
        found = _ENC2.match(body)
        return None if found is None else found.group(1).decode("ascii")
    if not body.startswith(SEALED_PREFIX):
        return None
    return body[len(SEALED_PREFIX) :].partition(":")[0]


def _decode_key(key_id: str, text: str) -> bytes:
    """32 bytes from standard or URL-safe base64 (padding optional), strictly."""
    text = text.strip().translate(str.maketrans("-_", "+/"))
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataKeyError(f"data key {key_id!r} is not standard or URL-safe base64") from exc
    if len(raw) != 32:
        raise DataKeyError(
            f"data key {key_id!r} is {len(raw)} bytes; AES-256 needs 32 (make one with "
            "python -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())')"
        )
    return raw


@dataclass(frozen=True)
class DataKeys:
    """The data keys of one process: ``primary`` seals, every one in ``keys`` opens."""

    primary: str
    keys: Mapping[str, bytes] = field(repr=False)
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False, compare=False)

    def _cipher(self, key_id: str) -> AESGCM:
        """One AESGCM per key (its key schedule made once, not per message)."""
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            cipher = self._ciphers[key_id] = AESGCM(self.keys[key_id])
        return cipher

    @classmethod
    def parse(cls, text: str, *, source: str = KEYS_ENV) -> DataKeys:
        """``ID:BASE64`` entries separated by commas or new lines (``#`` comments)."""
        entries = [
            entry.strip()
            for line in text.splitlines()
            for entry in line.partition("#")[0].split(",")
            if entry.strip()
        ]
        if not entries:
            raise DataKeyError(f"{source} names no key: expected ID:BASE64[,ID:BASE64...]")
        keys: dict[str, bytes] = {}
        for entry in entries:
            key_id, colon, encoded = entry.partition(":")
            key_id = key_id.strip()
            if not colon or not _KEY_ID.fullmatch(key_id):
                raise DataKeyError(
                    f"{source}: each entry is ID:BASE64 with an ID of 1-32 letters, digits, "
                    f"'.', '_' or '-' (entry {len(keys) + 1} is not)"
                )
            if key_id in keys:
                raise DataKeyError(f"{source}: key id {key_id!r} is listed twice")
            keys[key_id] = _decode_key(key_id, encoded)
        return cls(next(iter(keys)), keys)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> DataKeys | None:
        """The keys ``OVERSTORY_DATA_KEYS`` or ``OVERSTORY_DATA_KEY_FILE`` give (not
        both); ``None`` when neither is set (history is stored in the clear)."""
        env = os.environ if environ is None else environ
        inline, path = env.get(KEYS_ENV, "").strip(), env.get(KEY_FILE_ENV, "").strip()
        if inline and path:
            raise DataKeyError(f"set {KEYS_ENV} or {KEY_FILE_ENV}, not both")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise DataKeyError(f"{KEY_FILE_ENV}: cannot read {path!r}: {exc.strerror}") from exc
            return cls.parse(text, source=f"{KEY_FILE_ENV} ({path})")
        return cls.parse(inline) if inline else None

    def __repr__(self) -> str:  # never the key bytes
        return f"DataKeys(primary={self.primary!r}, ids={sorted(self.keys)!r})"

    # --- sealing -------------------------------------------------------------------------

    @staticmethod
    def _aad(key_id: str, conversation_id: str, seq: int) -> bytes:
        # Unambiguous: a key id and a seq hold no NUL, and the conversation id comes last.
        return f"{key_id}\0{seq}\0{conversation_id}".encode()

    def seal(self, body: str, conversation_id: str, seq: int) -> str:
        """``body`` sealed with the primary key, bound to its conversation and seq, as
        ``enc1`` text (for records kept inside text: settings, vault documents)."""
        nonce = os.urandom(_NONCE)
        aad = self._aad(self.primary, conversation_id, seq)
        sealed = self._cipher(self.primary).encrypt(nonce, body.encode("utf-8"), aad)
        return f"{SEALED_PREFIX}{self.primary}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def seal_bytes(self, body: str, conversation_id: str, seq: int) -> bytes:
        """``body`` sealed with the primary key, bound to its conversation and seq, as an
        ``enc2`` record (bytes: what message bodies are stored as)."""
        nonce = os.urandom(_NONCE)
        aad = self._aad(self.primary, conversation_id, seq)
        sealed = self._cipher(self.primary).encrypt(nonce, body.encode("utf-8"), aad)
        return b"%s%s:%s%s" % (SEALED_BYTES_PREFIX, self.primary.encode("ascii"), nonce, sealed)

    def open(self, body: str | bytes, conversation_id: str, seq: int) -> str:
        """The plain body of a sealed one, ``enc2`` bytes or ``enc1`` text (a plain body
        — text not starting ``enc1:`` — is returned as it is)."""
        if isinstance(body, bytes):
            found = _ENC2.match(body)
            if found is None:
                raise DataKeyError(
                    f"message {seq} of {conversation_id!r} is stored as bytes but is not a "
                    f"sealed record (it does not start enc2:<key id>:; {len(body)} bytes)"
                )
            key_id = found.group(1).decode("ascii")
            raw = body[found.end() :]
        elif body.startswith(SEALED_PREFIX):
            key_id, _, token = body[len(SEALED_PREFIX) :].partition(":")
            raw = b""
        else:
            return body
        if key_id not in self.keys:
            raise DataKeyError(
                f"message {seq} of {conversation_id!r} is sealed with data key {key_id!r}, "
                f"which is not configured (configured: {', '.join(sorted(self.keys))})"
            )
        try:
            if isinstance(body, str):
                raw = base64.b64decode(token, validate=True)
            if len(raw) < _NONCE + _TAG:
                raise ValueError(f"{len(raw)} bytes of nonce, ciphertext and tag: cut short")
            plain = self._cipher(key_id).decrypt(
                raw[:_NONCE], raw[_NONCE:], self._aad(key_id, conversation_id, seq)
            )
            return plain.decode("utf-8")
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise DataKeyError(
                f"message {seq} of {conversation_id!r} does not open with data key "
                f"{key_id!r}: it was altered, moved from another conversation or position, "
                f"or the key is wrong ({type(exc).__name__})"
            ) from exc

    def check_value(self, key_id: str) -> str:
        """A sealed constant for ``key_id``: stored once, it tells a wrong key at start."""
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(self.keys[key_id]).encrypt(nonce, _CHECK_TEXT, key_id.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def opens_check(self, key_id: str, check: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(check)
            plain = AESGCM(self.keys[key_id]).decrypt(raw[:_NONCE], raw[_NONCE:], key_id.encode())
        except (InvalidTag, binascii.Error, ValueError, KeyError):
            return False
        return plain == _CHECK_TEXT


def verify_checks(keys: DataKeys | None, stored: str | None, where: str) -> dict[str, str] | None:
    """Compare a store's check values with the configured keys (at open).

    Raises :class:`DataKeyError` when the store has sealed records but no key is
    configured, when a key id it has seen is not configured, or when a configured key
    does not open its id's check value. Returns the check values to store when the
    primary key has not sealed here before (else ``None``). Only ids that sealed are
    kept, so an old key may leave the configuration once ``rotate-data`` has re-sealed
    everything it sealed (which then drops its check value)."""
    checks: dict[str, str] = json.loads(stored) if stored else {}
    if keys is None:
        if checks:
            raise DataKeyError(
                f"the history in {where} is encrypted (data key ids: {', '.join(sorted(checks))}) "
                f"but no key is configured: set {KEYS_ENV} or {KEY_FILE_ENV}"
            )
        return None
    missing = sorted(set(checks) - set(keys.keys))
    if missing:
        raise DataKeyError(
            f"the history in {where} holds records sealed with data key(s) "
            f"{', '.join(map(repr, missing))}, which are not configured "
            f"(configured: {', '.join(map(repr, sorted(keys.keys)))}); keep every old key "
            "listed after the first until `overstory keys rotate-data` has re-sealed them"
        )
    for key_id, check in checks.items():
        if not keys.opens_check(key_id, check):
            raise DataKeyError(
                f"data key {key_id!r} is wrong for {where}: it does not open the check value "
                "stored when that id first sealed a record there"
            )
    if keys.primary in checks:
        return None
    return {**checks, keys.primary: keys.check_value(keys.primary)}


class SealedStore(SettingsStore, Protocol):
    """What :func:`reseal` needs of a store (every :class:`~.base.HistoryStore`)."""

    data_keys: DataKeys | None


#: A re-sealer: ``(store, keys, batch) -> counts`` ("examined", "resealed", "skipped"),
#: sealing its owner's records under ``keys.primary``, each by compare-and-set; a record
#: that changed meanwhile is re-read (or counted "skipped": the old keys then stay). The
#: store is the :class:`~.base.HistoryStore` :func:`reseal` was given.
Resealer = Callable[[Any, DataKeys, int], Awaitable[Mapping[str, int]]]
_RESEALERS: dict[str, Resealer] = {}


def register_resealer(name: str, resealer: Resealer) -> None:
    """Run ``resealer`` in every :func:`reseal` (a module that keeps sealed records
    calls this at import; registering a name again replaces its re-sealer)."""
    _RESEALERS[name] = resealer


def resealers() -> tuple[str, ...]:
    """The names of the registered re-sealers, in the order they run."""
    return tuple(_RESEALERS)


async def reseal_settings(
    store: Any,
    prefix: str,
    batch: int,
    resealed: Callable[[str, str | None], str | None],
) -> dict[str, int]:
    """The re-sealer of a family of settings (keys starting with ``prefix``), page by
    page: each value becomes ``resealed(key, value)`` by compare-and-set (``None``:
    nothing to do — gone, or under the primary key already), read again if a writer
    changed it meanwhile; one that kept changing is counted ``skipped``."""
    counts = {"examined": 0, "resealed": 0, "skipped": 0}
    after = ""
    while page := await store.settings(prefix, after=after, limit=batch):
        for key, _raw in page:
            counts["examined"] += 1
            try:
                done = await update(store, key, partial(resealed, key), backoff=Backoff(attempts=8))
            except SettingContended:
                counts["skipped"] += 1
                continue
            counts["resealed"] += done.changed
        after = page[-1][0]
    return counts


async def reseal(
    store: SealedStore, *, batch: int = 500, require: Collection[str] = ()
) -> dict[str, Any]:
    """Seal every record not under the primary key with it (plain ones, and those sealed
    with an older key): every registered re-sealer's, page by page, each by
    compare-and-set, so a store in use may be re-sealed while it serves. When nothing is
    left under another key, the older keys' check values are dropped, so those keys may
    leave the configuration. ``require``: re-sealers that must be registered (the
    caller's list of owners; a missing one fails before anything is written). Returns
    the counts."""
    keys = store.data_keys
    if keys is None:
        raise DataKeyError(f"no data key is configured: set {KEYS_ENV} or {KEY_FILE_ENV}")
    missing = sorted(set(require) - set(_RESEALERS))
    if missing:
        raise DataKeyError(
            f"no re-sealer is registered for {', '.join(missing)} (registered: "
            f"{', '.join(_RESEALERS) or 'none'}): import the modules that keep those records"
        )
    counts = {"examined": 0, "resealed": 0, "skipped": 0}
    for resealer in list(_RESEALERS.values()):
        for name, n in (await resealer(store, keys, batch)).items():
            counts[name] += n
    if not counts["skipped"]:
        only = json.dumps({keys.primary: keys.check_value(keys.primary)})

        def primary_only(stored: str | None) -> str | None:
            if stored is not None and set(json.loads(stored)) == {keys.primary}:
                return None
            return only

        await update(store, DATA_KEYS.key(), primary_only)
    counts["key"] = keys.primary  # type: ignore[assignment]
    return counts
