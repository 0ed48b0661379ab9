"""The run folder `runs/<name>/`: config snapshot, append-only evaluation log, checkpoints, Pareto set.

Layout:
    config.yaml            the validated config as started (its hash guards `resume`)
    evaluations.jsonl      one JSON record per finished candidate, appended and fsynced
    checkpoints/ckpt-NNNNNN.json   optimizer, population, RNG and counters after generation NNNNNN
    pareto.json            the current Pareto set (rewritten atomically each generation)
    verify.json            full-test-split scores of Pareto members (`evomerge verify`)

Every rewrite goes through a temporary file and `os.replace`, so a crash leaves either the old
or the new file, never half of one. The log is append-only; a torn last line (a crash in the
middle of a write) is detected and ignored on reading. Checkpoints carry a SHA-256 of their body;
a corrupt latest checkpoint falls back to the previous one with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from evomerge._atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "evaluations.jsonl"
PARETO_FILE = "pareto.json"
VERIFY_FILE = "verify.json"
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 3


class RunStoreError(RuntimeError):
    """A run folder that cannot be created, resumed or read."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class RunStore:
    root: Path

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, root: str | os.PathLike, config_text: str, *, overwrite: bool = False) -> "RunStore":
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise RunStoreError(
                    f"{root} already holds a run. Resume it with `evomerge resume {root}`, pick another "
                    "`name`, or pass --overwrite to start over (the old run is deleted)."
                )
            import shutil

            shutil.rmtree(root)
        (root / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / CONFIG_FILE, config_text)
        (root / LOG_FILE).touch()
        return cls(root)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "RunStore":
        root = Path(root)
        if not (root / CONFIG_FILE).is_file():
            raise RunStoreError(f"{root}: not a run folder (no {CONFIG_FILE})")
        return cls(root)

    @property
    def config_text(self) -> str:
        return (self.root / CONFIG_FILE).read_text()

    @property
    def config_hash(self) -> str:
        return _digest(self.config_text)

    # ----------------------------------------------------------------- log
    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        with open(self.root / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> Iterator[dict[str, Any]]:
        path = self.root / LOG_FILE
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
        for number, line in enumerate(lines, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a crash mid-write tears only the last line
                    log.warning("%s: ignoring a torn last line (a crash during a write)", path)
                else:
                    raise RunStoreError(f"{path}: line {number} is not valid JSON") from None

    def truncate_log(self, keep_ids: set[int]) -> None:
        """Rewrite the log keeping only records whose candidate id is in keep_ids (atomic)."""
        kept = [r for r in self.records() if r.get("id") in keep_ids]
        write_text_atomic(self.root / LOG_FILE, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, generation: int, state: dict[str, Any]) -> Path:
        body = json.dumps(state, sort_keys=True, separators=(",", ":"))
        path = self.root / CHECKPOINT_DIR / f"ckpt-{generation:06d}.json"
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
