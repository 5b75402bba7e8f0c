"""``overstory backup DEST`` and ``overstory restore SRC --store URL``: the store only.

Both open the store *raw* (no data key needed or checked, nothing written at open): a
backup copies records as stored, sealed ones sealed, and writes nothing to the store it
reads; a restore writes into an empty store and then checks the audit chain it wrote.
The format and what each store's snapshot guarantees: :mod:`overstory.store.backup`,
docs/operations/backup.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..store import HistoryStore, run_on_store
from ..store.backup import (
    Manifest,
    Restored,
    counts_line,
    read_manifest,
    restore_backup,
    write_backup,
)
from ..store.crypto import DataKeys

__all__ = ["add_commands", "backup", "restore"]


def add_commands(sub: Any) -> None:
    """The two commands' parsers."""
    backup_cmd = sub.add_parser(
        "backup",
        help="write a consistent snapshot of the store to one file while the tree serves "
        "(sealed records stay sealed); the store only",
    )
    backup_cmd.add_argument("dest", metavar="DEST", type=Path, help="the file to write")
    backup_cmd.add_argument("--store", help="store URL (default: OVERSTORY_STORE, else sqlite)")
    backup_cmd.add_argument("--config", type=Path, help="TOML config file (its store)")
    backup_cmd.add_argument("--force", action="store_true", help="replace DEST if it exists")
    backup_cmd.add_argument("--json", action="store_true", help="one JSON object on stdout")
    restore_cmd = sub.add_parser(
        "restore",
        help="load a backup into an EMPTY store of either kind (SQLite -> MongoDB is a "
        "backup and a restore); or --check a backup file",
    )
    restore_cmd.add_argument("src", metavar="SRC", type=Path, help="the backup file")
    restore_cmd.add_argument("--store", help="the empty store to restore into (required)")
    restore_cmd.add_argument(
        "--check", action="store_true", help="read and check SRC whole; restore nothing"
    )
    restore_cmd.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _size(n: int) -> str:
    return (
        f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"
    )


def _describe(manifest: Manifest) -> str:
    keys = ", ".join(manifest.data_keys) or "none"
    return (
        f"{counts_line(manifest.counts)}; data keys sealing records: {keys}; "
        f"{_size(manifest.size)}, sha256 {manifest.sha256[:16]}..."
    )


def backup(args: argparse.Namespace, url: str) -> int:
    """``overstory backup DEST``."""
    manifest = run_on_store(
        url, lambda store: write_backup(store, args.dest, overwrite=args.force), raw=True
    )
    if args.json:
        print(json.dumps({**manifest.summary(), "store": url}, sort_keys=True))
        return 0
    print(
        f"overstory backup: {manifest.path} from {url} ({manifest.consistency}): "
        + _describe(manifest)
    )
    return 0


def restore(args: argparse.Namespace) -> int:
    """``overstory restore SRC --store URL`` (or ``--check``)."""
    from ..audit import records, verify
    from ..exceptions import UsageError

    if args.check:
        manifest = read_manifest(args.src)
        if args.json:
            print(json.dumps({**manifest.summary(), "intact": True}, sort_keys=True))
        else:
            print(
                f"overstory restore --check: {manifest.path} is intact: a {manifest.source} "
                f"backup of {manifest.created_at} ({manifest.consistency}): " + _describe(manifest)
            )
        return 0
    if not args.store:
        raise UsageError("restore: name the empty store to restore into with --store URL")
    keys = DataKeys.from_environment()

    async def go(store: HistoryStore) -> tuple[Restored, list[str], int]:
        restored = await restore_backup(args.src, store, keys=keys)
        return restored, await verify(store), len(await records(store))

    restored, problems, chained = run_on_store(args.store, go, raw=True)
    manifest = restored.manifest
    if args.json:
        print(
            json.dumps(
                {
                    **manifest.summary(),
                    "store": args.store,
                    "restored": restored.counts,
                    "data_keys": restored.keys,
                    "audit": {"records": chained, "intact": not problems, "problems": problems},
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"overstory restore: {manifest.path} ({manifest.source} backup of "
            f"{manifest.created_at}, {manifest.consistency}) into {args.store}: "
            + counts_line(restored.counts)
        )
        for key_id, state in restored.keys.items():
            advice = {
                "verified": "configured here, and it is the right key",
                "missing": "NOT configured here: the tree that opens this store needs it",
                "unchecked": "configured here; the backup holds no check value to test it",
                "wrong": "configured here with a different key",
            }[state]
            print(f"  data key {key_id!r}: {advice}")
        if problems:
            print(f"  the audit chain of {chained} record(s) is BROKEN:")
            for problem in problems:
                print(f"    {problem}")
        else:
            print(f"  the audit chain of {chained} record(s) is intact")
    return 1 if problems else 0
