"""The ledger outbox: settlements the database refused, kept on local disk until it takes them.

When the ledger writer cannot commit a batch (the database is down, a table is unwritable), it
writes the batch here and lets the generations count as settled: their rows are durable, and
their reservations stay held in the database until the rows are replayed, so no balance is
freed for a completion that is not yet billed.

Each spilled batch is one file, written in full under a temporary name, flushed to disk, then
renamed into place (an atomic step), so a file in the directory is always complete and never
changes again. Any process sharing the directory may replay any file: replaying settles its
rows (a row already in the ledger changes nothing) and then deletes the file, so two processes
replaying the same file at once bill nothing twice.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import msgspec

from tokenwire.accounting.ledger import LedgerRow

Settlement = tuple[LedgerRow, bool]  # the row, and whether it has a reservation to settle
_SUFFIX = ".jsonl"


class _Line(msgspec.Struct):
    row: dict[str, object]
    reserved: bool


class LedgerOutbox:
    """A directory of spilled settlement batches (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, items: list[Settlement]) -> Path:
        """Store ``items`` durably as one new file (blocking: run it in a thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"ledger-{int(time.time() * 1000):015d}-{os.getpid()}-{secrets.token_hex(4)}"
        final = self.directory / (name + _SUFFIX)
        temporary = self.directory / (name + ".tmp")
        lines = [msgspec.json.encode(_Line(row.columns(), reserved)) for row, reserved in items]
        with temporary.open("wb") as file:
            file.write(b"\n".join(lines) + b"\n")
            file.flush()
            os.fsync(file.fileno())
        temporary.rename(final)
        _fsync_directory(self.directory)
        return final

    def files(self) -> list[Path]:
        """The complete spilled batches, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("ledger-*" + _SUFFIX))

    def read(self, path: Path) -> list[Settlement]:
        """The settlements of one file (a file another process already replayed: none)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        items: list[Settlement] = []
        for raw in data.splitlines():
            if raw.strip():
                line = msgspec.json.decode(raw, type=_Line)
                items.append((msgspec.convert(_upgraded(line.row), LedgerRow), line.reserved))
        return items

    def remove(self, path: Path) -> None:
        """Forget a replayed file."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def pending_rows(self) -> int:
        """How many settlements wait in the outbox (reads every file: for tests and health)."""
        return sum(len(self.read(path)) for path in self.files())


def _upgraded(row: dict[str, object]) -> dict[str, object]:
    """A row spilled by a version before plans: its one amount, ``cost_micro``, was what the
    key was charged (migration 0004 reads the ledger's old rows the same way)."""
    if "charge_micro" in row:
        return row
    return {**row, "charge_micro": row.get("cost_micro"), "plan": None}


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories can't open."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
