"""The cache of in-world pretrained visual towers: entries keyed by a hash of what determines them.

An entry is a folder ``<cache_dir>/<kind>-<key>/`` whose ``tower.json`` (written last) marks it complete;
``key`` is a hash of a JSON spec holding everything that decides the tower's weights: its architecture, its
training recipe, a fingerprint of the data's bytes and the keys of the towers it was trained with. A stage
trains in ``<kind>-<key>.partial/`` (Lightning checkpoints there make it resumable) and the finished folder is
renamed into place, so a reader never sees half an entry. An exclusive lock file per entry makes concurrent
processes (two runs, or every rank of one) train a tower once: the first trains, the others wait and reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Bump when the tower-training code changes what a recipe produces, so old entries are not reused.
TOWER_FORMAT = 1
MARKER = "tower.json"


def tower_key(spec: dict[str, Any]) -> str:
    """The cache key of a tower spec (JSON-serialisable): 16 hex digits of its SHA-256."""
    text = json.dumps({"format": TOWER_FORMAT, **spec}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a shard folder's ``index.json`` and every shard it lists, in order: the data's identity."""
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist; expected a shard folder with an index.json")
    digest = hashlib.sha256(index_path.read_bytes())
    for shard in json.loads(index_path.read_text())["shards"]:
        with open(folder / shard["url"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class TowerCache:
    """The entries under ``root``: where a tower of ``kind`` and ``key`` lives and whether it is complete."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def work_dir(self, kind: str, key: str) -> Path:
        """Where the entry trains (its resumable checkpoints live here until it is complete)."""
        return self.root / f"{kind}-{key}.partial"

    def is_complete(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / MARKER).is_file()

    def info(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.entry(kind, key) / MARKER).read_text())

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Hold the entry's exclusive lock (blocking until another process releases it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{kind}-{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, kind: str, key: str, info: dict[str, Any], keep: tuple[str, ...]) -> Path:
        """Complete the entry from its work folder: drop everything but ``keep`` (names in the work folder),
        write ``tower.json`` last, and rename the folder into place. Call while holding ``lock``."""
        work, entry = self.work_dir(kind, key), self.entry(kind, key)
        for child in work.iterdir():
            if child.name not in keep:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        tmp = work / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, work / MARKER)
        if entry.exists():  # an incomplete entry left by hand: the lock says nobody is using it
            shutil.rmtree(entry)
        os.replace(work, entry)
        return entry
