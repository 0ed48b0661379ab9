"""The run folder `runs/<name>/`: config snapshot, append-only evaluation log, checkpoints, Pareto set.

Layout:
    config.yaml            the validated config as started (its hash guards `resume`)
    evaluations.jsonl      one JSON record per finished candidate, appended and fsynced
    checkpoints/ckpt-NNNNNN.json   optimizer, population, RNG and counters after generation NNNNNN
    pareto.json            the current Pareto set (rewritten atomically each generation)
    verify.json            full-test-split scores of Pareto members (`evomerge verify`)

    .lock                  held (flock) by the one process searching in the folder; holds its PID

Every rewrite goes through a temporary file and `os.replace`, so a crash leaves either the old
or the new file, never half of one. The log is append-only; a torn last line (a crash or a full
disk in the middle of a write) is ignored on reading and cut off, with a warning naming the bytes
dropped, before anything is appended. Checkpoints carry a SHA-256 of their body; a corrupt latest
checkpoint falls back to the previous one with a warning.

One process per run folder: `lock()` takes an exclusive `flock` on `.lock` (the kernel releases it
when the process dies, however it dies), so a second `search`/`resume` on the same folder is
refused with the holder's PID; a PID left behind by a dead process is reported as stale.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from evomerge._atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
META_FILE = "run.json"
LOG_FILE = "evaluations.jsonl"
PARETO_FILE = "pareto.json"
VERIFY_FILE = "verify.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
KEEP_CHECKPOINTS = 3
# What a run folder may hold; `--overwrite` deletes a folder only when it holds nothing else.
RUN_ENTRIES = {CONFIG_FILE, META_FILE, LOG_FILE, PARETO_FILE, VERIFY_FILE, CHECKPOINT_DIR, LOCK_FILE}


class RunStoreError(RuntimeError):
    """A run folder that cannot be created, resumed or read."""


class RunLockedError(RunStoreError):
    """Another live process holds the run folder."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _is_ours(entry: Path) -> bool:
    """A file the run store wrote: a known name, or a temporary file of an atomic write / plot."""
    name = entry.name
    return (name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".tmp"))
            or (name.startswith("member_") and name.endswith(".png")) or name in {"front.png", "trajectory.png"})


def check_replaceable_run(root: Path) -> None:
    """Raise unless `root` is a run folder holding only what evomerge writes there."""
    if not (root / CONFIG_FILE).is_file() or not (root / META_FILE).is_file():
        raise RunStoreError(f"{root} is not a run folder (no {CONFIG_FILE} and {META_FILE}); --overwrite only "
                            "replaces a run folder that evomerge made. Choose another `name` or `runs_dir`.")
    foreign = sorted(e.name for e in root.iterdir() if not _is_ours(e))
    if foreign:
        raise RunStoreError(f"{root} holds files evomerge did not write ({', '.join(foreign[:5])}); --overwrite "
                            "refuses to delete them. Move them away or choose another `name`.")


@dataclass
class RunStore:
    root: Path
    _lock_handle: Any = field(default=None, repr=False, compare=False)

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, root: str | os.PathLike, config_text: str, *, overwrite: bool = False) -> "RunStore":
        """A new run folder, locked by this process. With `overwrite`, an existing run folder
        (and only that: see `check_replaceable_run`) that no live process holds is replaced."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RunStoreError(f"{root} exists and is not a folder")
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise RunStoreError(
                    f"{root} already holds a run. Resume it with `evomerge resume {root}`, pick another "
                    "`name`, or pass --overwrite to start over (the old run is deleted)."
                )
            check_replaceable_run(root)
            old = cls(root)
            old.lock()  # refuses while the old search still runs
            try:
                for entry in root.iterdir():
                    if entry.name != LOCK_FILE:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                store = old
            except BaseException:
                old.unlock()
                raise
        else:
            root.mkdir(parents=True, exist_ok=True)
            store = cls(root)
            store.lock()
        (root / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / CONFIG_FILE, config_text)
        (root / LOG_FILE).touch()
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> "RunStore":
        root = Path(root)
        if not (root / CONFIG_FILE).is_file():
            raise RunStoreError(f"{root}: not a run folder (no {CONFIG_FILE})")
        return cls(root)

    # ----------------------------------------------------------------- one process per folder
    def lock(self) -> None:
        """Take the folder's exclusive lock or raise `RunLockedError` naming the holder's PID."""
        if self._lock_handle is not None:
            return
        path = self.root / LOCK_FILE
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(f"{self.root} is in use by another evomerge process (PID {holder}); wait for it "
                                     f"to finish or stop it (Ctrl-C) before starting another search or resume there") from None
            raise
        handle.seek(0)
        stale = handle.read().strip()
        if stale and stale != str(os.getpid()):
            pid = int(stale) if stale.isdigit() else None
            alive = pid is not None and _pid_alive(pid)
            log.warning("%s: taking over a stale lock left by PID %s (%s)", path, stale,
                        "a process of that number runs but does not hold the lock" if alive else "no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        """Release the lock (the PID is cleared first, so a later taker sees no stale holder)."""
        handle, self._lock_handle = self._lock_handle, None
        if handle is None:
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    @property
    def config_text(self) -> str:
        return (self.root / CONFIG_FILE).read_text()

    # ----------------------------------------------------------------- log
    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        with open(self.root / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> Iterator[dict[str, Any]]:
        """The log's records in order; a torn last line is skipped (`repair_log` cuts it off)."""
        path = self.root / LOG_FILE
        if not path.is_file():
            return
        records, torn = _parse_log(path.read_bytes(), path)
        if torn:
            log.warning("%s: ignoring a torn last line (%d bytes; a crash during a write)", path, torn)
        yield from records

    def repair_log(self) -> int:
        """Cut a torn last line (written partly by a crash or a full disk) before appending to the log,
        with one warning naming the file and the bytes dropped. Returns the number of bytes dropped."""
        path = self.root / LOG_FILE
        if not path.is_file():
            return 0
        data = path.read_bytes()
        _, torn = _parse_log(data, path)
        if torn:
            warnings.warn(f"{path}: dropped a torn last line ({torn} bytes) left by an interrupted write; the "
                          "candidate it held is evaluated again", stacklevel=2)
            with open(path, "r+b") as handle:
                handle.truncate(len(data) - torn)
                handle.flush()
                os.fsync(handle.fileno())
        return torn

    def drop_records(self, ids: set[int]) -> None:
        """Rewrite the log without the records of these candidate ids (atomic)."""
        kept = [r for r in self.records() if r.get("id") not in ids]
        write_text_atomic(self.root / LOG_FILE, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_path(self, generation: int) -> Path:
        return self.root / CHECKPOINT_DIR / f"ckpt-{generation:06d}.json"

    def save_checkpoint(self, generation: int, state: dict[str, Any]) -> Path:
        body = json.dumps(state, sort_keys=True, separators=(",", ":"))
        path = self.checkpoint_path(generation)
        write_text_atomic(path, json.dumps({"sha256": _digest(body), "generation": generation}) + "\n" + body + "\n")
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        return sorted((self.root / CHECKPOINT_DIR).glob("ckpt-*.json"))

    def load_latest_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that verifies; older ones are tried when the newest is corrupt."""
        for path in reversed(self.checkpoints()):
            try:
                header, body = path.read_text().split("\n", 1)
                meta = json.loads(header)
                body = body.rstrip("\n")
                if _digest(body) != meta["sha256"]:
                    raise ValueError("checksum mismatch")
                return int(meta["generation"]), json.loads(body)
            except (ValueError, KeyError, json.JSONDecodeError) as exc:
                warnings.warn(f"{path}: corrupt checkpoint ({exc}); falling back to the previous one", stacklevel=2)
        return None

    # ----------------------------------------------------------------- results
    def write_pareto(self, pareto: dict[str, Any]) -> None:
        write_json_atomic(self.root / PARETO_FILE, pareto)

    def read_pareto(self) -> dict[str, Any]:
        path = self.root / PARETO_FILE
        if not path.is_file():
            raise RunStoreError(f"{self.root}: no Pareto set yet ({PARETO_FILE} missing)")
        return json.loads(path.read_text())

    def write_verify(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.root / VERIFY_FILE, data)

    def read_verify(self) -> dict[str, Any] | None:
        path = self.root / VERIFY_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def _parse_log(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, bytes of a torn last line). A last line without its newline, or one that is not
    JSON, is torn (an interrupted write); a bad line before the last is corruption and an error."""
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" when the log ends with a newline
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(complete) and not tail:
                return records, len(line) + 1
            raise RunStoreError(f"{path}: line {number} is not valid JSON (the log is corrupt before its last "
                                "line; restore it from a backup or start a new run)") from None
    return records, len(tail)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
