"""Backups: a whole store in one portable file, and back into an empty store of either kind.

:func:`write_backup` reads a store through one :meth:`~.base.HistoryStore.snapshot`
while it serves and writes every record as stored (:mod:`.records`): sealed message
bodies, vault documents and job texts stay sealed, and no data key is needed or read.
:func:`restore_backup` checks the whole file first, then writes it into an *empty*
store of either kind — so moving from SQLite to MongoDB (or back) is a backup and a
restore.

The file (format version 2) is gzip'd JSON lines, ASCII::

    {"format": "overstory-backup", "version": 2, "created_at": "...Z", "source": "sqlite",
     "consistency": "transaction"}
    {"setting": {"key": "...", "value": "..."}}              # every setting, in key order
    {"message": {"conversation_id": "...", "seq": 0, ...}}    # then messages, vault, epochs
    ...
    {"end": {"counts": {"setting": 12, ...}, "data_keys": {"k1": {"check": "...",
     "records": 40}}, "sha256": "..."}}

A message body stored as bytes (a sealed ``enc2`` record, :mod:`.crypto`) is written as
``{"bytes": "<standard base64, padded>"}``, a JSON object where a text body is a JSON
string, so the two never mix up; a reader takes only that exact shape, in canonical
base64, so it comes back byte for byte. Version 1 (before bytes bodies) has text bodies
only; it is still read.

``sha256`` is over every line before the last, as written (newlines included): a file cut
short, corrupted or edited is refused, naming it, before anything is written. It is a
checksum, not a signature: whoever can write the file can recompute it (keep backups
where only operators write). ``data_keys`` lists each data key id that sealed a record
in the backup, with the store's check value for it (a key opens its check value: a
fingerprint that gives nothing away), so a restore says up front whether the keys
configured where it runs are the right ones.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..exceptions import BackupInvalid, DataKeyError, UsageError
from .base import HistoryStore
from .crypto import SEALED_PREFIX, DataKeys, key_id_of
from .records import KINDS, Record, RecordKind, check_record, order_key
from .settings import DATA_KEYS

__all__ = [
    "FORMAT",
    "READS",
    "VERSION",
    "KeyStatus",
    "Manifest",
    "Restored",
    "counts_line",
    "key_status",
    "read_manifest",
    "restore_backup",
    "write_backup",
]

FORMAT = "overstory-backup"
VERSION = 2
#: The format versions a reader accepts (1: text bodies only).
READS = (1, 2)
#: The longest line a reader accepts (a record with a very large body still fits).
MAX_LINE = 64 * 1024 * 1024
_SOURCES = ("sqlite", "mongodb")
_CONSISTENCIES = ("transaction", "snapshot-session", "per-conversation")
_SEALED = re.compile(re.escape(SEALED_PREFIX) + r"([A-Za-z0-9_.-]{1,32}):")
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: Whether the data keys configured where a restore runs can open a backup's records:
#: ``verified`` (configured, and it opens its check value), ``missing`` (not configured
#: here: the tree that opens the restored store needs it), ``wrong`` (configured here
#: under that id, but a different key), ``unchecked`` (configured; the backup holds no
#: check value to test it with).
KeyStatus = Literal["verified", "missing", "wrong", "unchecked"]


@dataclass(frozen=True)
class Manifest:
    """What a backup file says of itself (its first and last lines), checked."""

    path: str
    version: int
    created_at: str
    source: str
    consistency: str
    counts: dict[RecordKind, int]
    #: Each data key id that sealed records in the backup: its check value (``None``
    #: when the store kept none) and how many records it sealed.
    data_keys: dict[str, dict[str, Any]]
    sha256: str
    size: int = 0

    def summary(self) -> dict[str, Any]:
        """The manifest as JSON for the command's ``--json``."""
        return {
            "path": self.path,
            "version": self.version,
            "created_at": self.created_at,
            "source": self.source,
            "consistency": self.consistency,
            "counts": self.counts,
            "data_keys": sorted(self.data_keys),
            "sha256": self.sha256,
            "bytes": self.size,
        }


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_backup` wrote, and what the configured keys can open."""

    manifest: Manifest
    counts: dict[RecordKind, int]
    keys: dict[str, KeyStatus] = field(default_factory=dict)


def _line(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def _key_ids(kind: RecordKind, record: Record) -> set[str]:
    """The data key ids that sealed (parts of) a record."""
    text = {"message": "body", "vault": "document", "setting": "value"}.get(kind)
    if text is None:
        return set()
    value = record[text]
    if isinstance(value, bytes):  # one enc2 record
        key_id = key_id_of(value)
        return set() if key_id is None else {key_id}
    return set(_SEALED.findall(value))


def _portable(kind: RecordKind, record: Record) -> Record:
    """``record`` as a backup line holds it: a bytes body as ``{"bytes": BASE64}``."""
    if kind == "message" and isinstance(record["body"], bytes):
        return {**record, "body": {"bytes": base64.b64encode(record["body"]).decode("ascii")}}
    return record


def _from_portable(kind: object, value: object, version: int, where: str) -> object:
    """A line's record with a ``{"bytes": BASE64}`` body back as bytes (version 2 on),
    strictly: exactly that shape, canonical padded base64 — else :class:`BackupInvalid`.
    Anything else is left for :func:`~.records.check_record`."""
    if kind != "message" or not isinstance(value, dict) or not isinstance(value.get("body"), dict):
        return value
    body = value["body"]
    encoded = body.get("bytes")
    if version < 2 or set(body) != {"bytes"} or not isinstance(encoded, str):
        raise BackupInvalid(f"{where}: message field 'body' has a bad value {body!r:.80}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackupInvalid(f"{where}: message body is not base64 ({exc})") from exc
    if base64.b64encode(raw).decode("ascii") != encoded:
        raise BackupInvalid(f"{where}: message body is not canonical base64")
    return {**value, "body": raw}


class _Tally:
    """Counts and key ids of the records passing by, and the digest of their lines."""

    def __init__(self) -> None:
        self.counts: dict[RecordKind, int] = dict.fromkeys(KINDS, 0)
        self.sealed: dict[str, int] = {}
        self.checks: dict[str, str] = {}
        self.digest = hashlib.sha256()

    def add(self, kind: RecordKind, record: Record) -> None:
        self.counts[kind] += 1
        for key_id in _key_ids(kind, record):
            self.sealed[key_id] = self.sealed.get(key_id, 0) + 1
        if kind == "setting" and record["key"] == DATA_KEYS.key():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self.checks = {str(k): str(v) for k, v in json.loads(record["value"]).items()}

    def data_keys(self) -> dict[str, dict[str, Any]]:
        return {
            key_id: {"check": self.checks.get(key_id), "records": self.sealed.get(key_id, 0)}
            for key_id in sorted(set(self.sealed) | set(self.checks))
        }


# --- writing ---------------------------------------------------------------------------


async def write_backup(
    store: HistoryStore, dest: str | os.PathLike[str], *, overwrite: bool = False
) -> Manifest:
    """Write every record of ``store`` to ``dest`` (see the module doc) from one
    snapshot, while the store serves. The file appears at ``dest`` only once complete and
    on disk (written beside it first); an existing ``dest`` is refused unless
    ``overwrite``."""
    source = "sqlite" if store.url.startswith("sqlite:") else "mongodb"
    out = _Writer(Path(dest), overwrite)
    try:
        async with store.snapshot() as snapshot:
            created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            out.emit(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "created_at": created_at,
                    "source": source,
                    "consistency": snapshot.consistency,
                }
            )
            for kind in KINDS:
                async for record in snapshot.records(kind):
                    out.tally.add(kind, record)
                    out.emit({kind: _portable(kind, record)})
        manifest = Manifest(
            str(out.path),
            VERSION,
            created_at,
            source,
            snapshot.consistency,
            out.tally.counts,
            out.tally.data_keys(),
            out.tally.digest.hexdigest(),
        )
        size = out.finish({"end": _trailer(manifest)})
    finally:
        out.discard()
    return dataclasses.replace(manifest, size=size)


class _Writer:
    """A backup file being written: beside ``path`` until :meth:`finish` moves it there
    whole and on disk; :meth:`discard` removes what is left of an unfinished one."""

    def __init__(self, path: Path, overwrite: bool) -> None:
        if path.exists() and not overwrite:
            raise UsageError(f"backup {str(path)!r} exists already; name a new file")
        if not path.parent.is_dir():
            raise UsageError(f"backup {str(path)!r}: directory {str(path.parent)!r} does not exist")
        self.path, self.overwrite = path, overwrite
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self.tally = _Tally()
        self._raw = open(self.partial, "wb")  # noqa: SIM115 (closed by finish or discard)
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)

    def emit(self, obj: object) -> None:
        """Write one line, counted in the checksum."""
        line = _line(obj)
        self.tally.digest.update(line)
        self._gzip.write(line)

    def finish(self, end: object) -> int:
        """Write the end record (outside the checksum), sync and publish; the size."""
        self._gzip.write(_line(end))
        self._gzip.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        _publish(self.partial, self.path, self.overwrite)
        return self.path.stat().st_size

    def discard(self) -> None:
        self._gzip.close()
        self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)


def _trailer(manifest: Manifest) -> dict[str, Any]:
    return {"counts": manifest.counts, "data_keys": manifest.data_keys, "sha256": manifest.sha256}


def _publish(partial: Path, path: Path, overwrite: bool) -> None:
    """Move the finished file to ``path`` (never over another file unless ``overwrite``)."""
    if overwrite:
        os.replace(partial, path)
    else:
        try:
            os.link(partial, path)  # atomic, and fails if path exists meanwhile
        except FileExistsError as exc:
            raise UsageError(f"backup {str(path)!r} appeared while it was written") from exc
        except OSError:  # a file system without hard links
            if path.exists():
                raise UsageError(f"backup {str(path)!r} appeared while it was written") from None
            os.replace(partial, path)
    with contextlib.suppress(OSError):  # the directory entry on disk too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- reading ---------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The file's lines, numbered from 1; :class:`BackupInvalid` for a file that is not
    a whole gzip stream of lines."""
    name = str(path)
    try:
        with gzip.open(path, "rb") as f:
            number = 0
            while line := f.readline(MAX_LINE + 1):
                number += 1
                if len(line) > MAX_LINE:
                    raise BackupInvalid(
                        f"backup {name!r}, line {number}: longer than {MAX_LINE} bytes"
                    )
                yield number, line
    except FileNotFoundError as exc:
        raise BackupInvalid(f"backup {name!r} does not exist") from exc
    except EOFError as exc:
        raise BackupInvalid(
            f"backup {name!r} is truncated: its compressed stream ends early (was the copy or "
            "the backup interrupted?)"
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise BackupInvalid(f"backup {name!r} is corrupted or not a backup: {exc}") from exc
    except OSError as exc:
        raise BackupInvalid(f"backup {name!r} cannot be read: {exc}") from exc


def _parse(name: str, number: int, line: bytes) -> Any:
    if not line.endswith(b"\n"):
        raise BackupInvalid(f"backup {name!r} is truncated: line {number} is cut short")
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackupInvalid(f"backup {name!r}, line {number}: not JSON ({exc})") from exc


def _check_header(name: str, header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupInvalid(f"backup {name!r} is not an overstory backup (no {FORMAT!r} header)")
    version = header.get("version")
    if type(version) is not int or version not in READS:
        raise BackupInvalid(
            f"backup {name!r} is format version {version!r:.20}; this overstory reads "
            f"versions {', '.join(map(str, READS))}"
        )
    if header.get("source") not in _SOURCES or header.get("consistency") not in _CONSISTENCIES:
        raise BackupInvalid(f"backup {name!r}: header names no known source or consistency")
    if not isinstance(header.get("created_at"), str):
        raise BackupInvalid(f"backup {name!r}: header has no creation time")
    return header


def _check_trailer(name: str, end: Any, tally: _Tally) -> dict[str, Any]:
    if not isinstance(end, dict) or set(end) != {"counts", "data_keys", "sha256"}:
        raise BackupInvalid(f"backup {name!r}: the end record is malformed")
    digest = tally.digest.hexdigest()
    if not isinstance(end["sha256"], str) or not _SHA256.fullmatch(end["sha256"]):
        raise BackupInvalid(f"backup {name!r}: the end record holds no sha256")
    if end["sha256"] != digest:
        raise BackupInvalid(
            f"backup {name!r} was altered: its records' sha256 is {digest[:16]}..., the file "
            f"says {end['sha256'][:16]}..."
        )
    if end["counts"] != tally.counts:
        raise BackupInvalid(
            f"backup {name!r} holds {tally.counts} record(s) but says {end['counts']!r:.200}"
        )
    if end["data_keys"] != tally.data_keys():
        raise BackupInvalid(f"backup {name!r}: its data key list does not match its records")
    return end


def _records(
    src: str | os.PathLike[str], manifest: list[Manifest]
) -> Iterator[tuple[RecordKind, Record]]:
    """Every record of the backup at ``src``, each checked as it is read (a well-formed
    header first, records in kind and key order, nothing after the end record, the
    checksum and counts); the :class:`Manifest` is appended to ``manifest`` once the end
    record checked out. Any problem: :class:`BackupInvalid`."""
    path = Path(src)
    name = str(path)
    tally = _Tally()
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    last: tuple[int, tuple[Any, ...]] | None = None
    number = 0
    for number, line in _lines(path):
        obj = _parse(name, number, line)
        if header is None:
            header = _check_header(name, obj)
            tally.digest.update(line)
            continue
        if end is not None:
            raise BackupInvalid(f"backup {name!r}, line {number}: data after the end record")
        if not isinstance(obj, dict) or len(obj) != 1:
            raise BackupInvalid(f"backup {name!r}, line {number}: not a record")
        ((kind_name, value),) = obj.items()
        if kind_name == "end":
            end = _check_trailer(name, value, tally)
            continue
        where = f"backup {name!r}, line {number}"
        value = _from_portable(kind_name, value, int(header["version"]), where)
        kind, record = check_record(kind_name, value, where)
        place = (KINDS.index(kind), order_key(kind, record))
        if last is not None and place <= last:
            raise BackupInvalid(
                f"backup {name!r}, line {number}: {kind} record out of order or repeated"
            )
        last = place
        tally.digest.update(line)
        tally.add(kind, record)
        yield kind, record
    if header is None:
        raise BackupInvalid(f"backup {name!r} is empty")
    if end is None:
        raise BackupInvalid(
            f"backup {name!r} is truncated: no end record after line {number} (was the "
            "backup interrupted?)"
        )
    manifest.append(
        Manifest(
            name,
            int(header["version"]),
            str(header["created_at"]),
            str(header["source"]),
            str(header["consistency"]),
            dict(tally.counts),
            tally.data_keys(),
            tally.digest.hexdigest(),
            path.stat().st_size,
        )
    )


def read_manifest(src: str | os.PathLike[str]) -> Manifest:
    """Read and check the whole backup at ``src`` (see :func:`_records`); its manifest."""
    found: list[Manifest] = []
    for _ in _records(src, found):
        pass
    return found[0]


def key_status(manifest: Manifest, keys: DataKeys | None) -> dict[str, KeyStatus]:
    """For each data key id the backup needs, whether ``keys`` (those configured where
    the restore runs) hold it (see :data:`KeyStatus`)."""
    status: dict[str, KeyStatus] = {}
    for key_id, use in manifest.data_keys.items():
        if keys is None or key_id not in keys.keys:
            status[key_id] = "missing"
        elif use.get("check") is None:
            status[key_id] = "unchecked"
        else:
            status[key_id] = "verified" if keys.opens_check(key_id, use["check"]) else "wrong"
    return status


async def restore_backup(
    src: str | os.PathLike[str], store: HistoryStore, *, keys: DataKeys | None
) -> Restored:
    """Write the backup at ``src`` into ``store``, which must be empty (else
    :class:`~overstory.exceptions.StoreNotEmpty`). The whole file is read and checked
    first (:class:`~overstory.exceptions.BackupInvalid`), and the configured ``keys``
    against its check values (a *wrong* key raises
    :class:`~overstory.exceptions.DataKeyError`; a missing one is reported): a refusal
    writes nothing. Records are copied as stored (sealed ones stay sealed). If the
    store fails part-way, what was written stays: discard that store and restore again.
    ``store`` is best opened raw (``open_store(url, raw=True)``): opening a store with
    keys writes their check value, and the store is then no longer empty."""
    await store.require_empty()
    manifest = read_manifest(src)
    status = key_status(manifest, keys)
    wrong = sorted(k for k, s in status.items() if s == "wrong")
    if wrong:
        raise DataKeyError(
            f"backup {manifest.path!r} was sealed with data key(s) {', '.join(map(repr, wrong))} "
            "and the key(s) configured here under those ids are different: configure the "
            "keys the backed-up tree used"
        )
    again: list[Manifest] = []

    async def records() -> AsyncIterator[tuple[RecordKind, Record]]:
        for item in _records(src, again):
            yield item

    counts = await store.import_records(records())
    if not again or again[0].sha256 != manifest.sha256:
        raise BackupInvalid(
            f"backup {manifest.path!r} changed while it was restored: discard {store.url} "
            "and restore again"
        )
    return Restored(manifest, counts, status)


def counts_line(counts: Mapping[RecordKind, int]) -> str:
    """``12 settings, 40 messages, 3 vault documents, 2 conversation epochs``."""
    names = {
        "setting": "settings",
        "message": "messages",
        "vault": "vault documents",
        "conversation": "conversation epochs",
    }
    return ", ".join(f"{counts.get(kind, 0)} {names[kind]}" for kind in KINDS)
