"""Convert LLaVA JSON data sets into WebDataset shards: ``python -m datamodules.convert --json FILE ...``.

Reads the layouts of ``blip_laion_cc_sbu_558k.json`` (caption pretraining: ``{"id", "image",
"conversations"}``) and ``llava_v1_5_mix665k.json`` (multi-turn instructions, images under several folders
such as ``coco/``, ``gqa/``, ``ocr_vqa/``, ``textvqa/``, ``vg/``, plus text-only entries without ``image``).
The JSON is streamed with ijson (never loaded whole); each entry's image is looked up under the
``--image-root`` folders in order, checked by decoding it (JPEG in reduced-size draft mode, so a truncated
file is caught cheaply) and stored with its original bytes (other formats are re-encoded as PNG). Entry
``i`` becomes sample ``<i:09d>`` with members ``.json`` (the record, unchanged) and ``.jpg``/``.png``/
``.webp`` (the image, if any): the record format the training stream (``datamodules.shards``) reads.
Entries whose image is missing or unreadable, or that are not records, are skipped and listed with their
id in ``skipped.tsv``. Shards are written to a temporary name and renamed when full; after each one the
progress (the next entry to read) is saved in ``convert_state.json``, so rerunning the same command after
an interruption keeps the finished shards and continues from there. ``index.json`` (per-shard sample
counts) is written last, only when the whole file has been converted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

STATE_FILE = "convert_state.json"
SKIP_LOG = "skipped.tsv"
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ConvertError(ValueError):
    """Input or output that cannot be converted; the message is one line naming the file."""


@dataclasses.dataclass
class Entry:
    """One JSON entry after its image was looked up: the sample to write, or why it is skipped."""

    index: int
    record: Any
    ext: str | None = None
    image: bytes | None = None
    skip: str | None = None  # missing_image | unreadable_image | bad_record
    detail: str = ""

    @property
    def id(self) -> str:
        return str(self.record.get("id", "")) if isinstance(self.record, dict) else ""


def load_entry(index: int, record: Any, roots: tuple[Path, ...]) -> Entry:
    """Look up and check one entry's image (runs in the worker processes)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return Entry(index, record, skip="bad_record", detail="not an object with a 'conversations' list")
    name = record.get("image")
    if name is None or name == "":
        return Entry(index, record)  # text-only (the 665K mix's ShareGPT conversations)
    if not isinstance(name, str):
        return Entry(index, record, skip="bad_record", detail=f"'image' is {type(name).__name__}, not a path")
    path = next((root / name for root in roots if (root / name).is_file()), None)
    if path is None:
        return Entry(index, record, skip="missing_image", detail=name)
    try:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        if fmt == "JPEG":
            image.draft("RGB", (64, 64))  # decode at 1/8 size: enough to find a corrupt or truncated file
        image.load()
        ext = FORMAT_EXTENSIONS.get(fmt or "")
        if ext is None:  # GIF, BMP, TIFF, ...: store as PNG
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
    except Exception as err:  # PIL raises many types for unreadable files
        return Entry(index, record, skip="unreadable_image", detail=f"{path}: {err}")
    return Entry(index, record, ext=ext, image=data)


def _load_entry_args(args: tuple[int, Any, tuple[Path, ...]]) -> Entry:
    return load_entry(*args)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # archive bytes depend on the content only
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files of ``per_shard`` samples; a shard appears when full."""

    def __init__(self, out: Path, per_shard: int, state: dict[str, Any]) -> None:
        self.out = out
        self.per_shard = per_shard
        self.state = state
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.first_entry = state["next_entry"]

    @property
    def partial(self) -> Path:
        return self.out / f".shard-{len(self.state['shards']):06d}.tar.partial"

    def add(self, entry: Entry) -> None:
        if self.tar is None:
            self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
        key = f"{entry.index:09d}"
        _tar_add(self.tar, f"{key}.json", json.dumps(entry.record, ensure_ascii=False).encode("utf-8"))
        if entry.image is not None:
            _tar_add(self.tar, f"{key}.{entry.ext}", entry.image)
        self.count += 1

    def finish(self, next_entry: int) -> None:
        """Close the shard being written (entries before ``next_entry`` are in it or skipped) and record it."""
        if self.tar is None:
            return
        self.tar.close()
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        url = f"shard-{len(self.state['shards']):06d}.tar"
        os.replace(self.partial, self.out / url)
        self.state["shards"].append(
            {"url": url, "num_samples": self.count, "entries": [self.first_entry, next_entry]}
        )
        self.state["next_entry"] = next_entry
        _write_json_atomic(self.out / STATE_FILE, self.state)
        self.tar, self.count, self.first_entry = None, 0, next_entry

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _stream_entries(path: Path, start: int, bar: tqdm | None) -> Iterator[tuple[int, Any]]:
    import ijson

    with open(path, "rb") as f:
        try:
            for index, record in enumerate(ijson.items(f, "item", use_float=True)):
                if bar is not None:
                    bar.update(f.tell() - bar.n)
                if index >= start:
                    yield index, record
        except ijson.JSONError as err:
            reason = " ".join(str(err).split())  # yajl's messages span lines
            raise ConvertError(f"{path}: not a JSON list of LLaVA records ({reason})") from None


def _new_state(json_path: Path, per_shard: int) -> dict[str, Any]:
    stat = json_path.stat()
    return {
        "json": str(json_path.resolve()),
        "json_size": stat.st_size,
        "samples_per_shard": per_shard,
        "shards": [],
        "next_entry": 0,
        "skipped": {},
        "text_only": 0,
        "done": False,
    }


def _load_state(out: Path, json_path: Path, per_shard: int) -> dict[str, Any]:
    path = out / STATE_FILE
    fresh = _new_state(json_path, per_shard)
    if not path.is_file():
        if (out / "index.json").is_file():
            raise ConvertError(
                f"{out / 'index.json'} exists but was not written by this converter; use another --out"
            )
        return fresh
    try:
        state = json.loads(path.read_text())
        same = all(state[k] == fresh[k] for k in ("json", "json_size", "samples_per_shard"))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConvertError(f"{path} is malformed ({err}); delete it to convert from scratch") from None
    if not same:
        raise ConvertError(
            f"{path} belongs to a conversion of {state.get('json')} ({state.get('json_size')} bytes, "
            f"{state.get('samples_per_shard')} per shard); rerun with the same arguments or another --out"
        )
    for shard in state["shards"]:
        if not (out / shard["url"]).is_file():
            raise ConvertError(f"{path} lists {shard['url']}, which is missing; delete {out} and start again")
    return state


def _trim_skip_log(path: Path, next_entry: int) -> None:
    """Keep the skip log's lines for entries that finished shards cover (the rest is redone)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [
        line
        for line in lines
        if line.split("\t", 1)[0].isdigit() and int(line.split("\t", 1)[0]) < next_entry
    ]
    path.write_text("".join(kept))


def convert(
    json_path: str | Path,
    image_roots: Iterable[str | Path],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert one LLaVA JSON file into ``out_dir``; returns the index written there (see module doc)."""
    json_path, out = Path(json_path), Path(out_dir)
    roots = tuple(Path(r) for r in image_roots)
    if not json_path.is_file():
        raise ConvertError(f"{json_path} does not exist")
    for root in roots:
        if not root.is_dir():
            raise ConvertError(f"image root {root} is not a folder")
    if samples_per_shard < 1:
        raise ConvertError("--samples-per-shard must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, json_path, samples_per_shard)
    if state["done"] and (out / "index.json").is_file():
        log.info("%s: conversion already complete", out)
        return json.loads((out / "index.json").read_text())
    start = time.perf_counter()
    resumed = state["next_entry"]
    if resumed:
        log.info("%s: resuming at entry %d after %d finished shards", out, resumed, len(state["shards"]))
    skip_log_path = out / SKIP_LOG
    _trim_skip_log(skip_log_path, resumed)
    for stale in out.glob(".shard-*.tar.partial"):
        stale.unlink()
    skipped: Counter[str] = Counter(state["skipped"])
    text_only = state["text_only"]
    writer = ShardWriter(out, samples_per_shard, state)
    bar = tqdm(
        total=json_path.stat().st_size, unit="B", unit_scale=True, desc="convert", disable=not progress
    )
    pool = Pool(workers) if workers > 0 else None
    try:
        tasks = ((i, record, roots) for i, record in _stream_entries(json_path, resumed, bar))
        results = pool.imap(_load_entry_args, tasks, chunksize=32) if pool else map(_load_entry_args, tasks)
        end = resumed
        with open(skip_log_path, "a") as skip_log:
            for entry in results:
                end = entry.index + 1
                if entry.skip is not None:
                    skipped[entry.skip] += 1
                    detail = entry.detail.replace("\t", " ").replace("\n", " ")
                    skip_log.write(f"{entry.index}\t{entry.id}\t{entry.skip}\t{detail}\n")
                else:
                    writer.add(entry)
                    text_only += entry.image is None
                # Counters as of the entries before the next one (they go into the state with a shard).
                state["skipped"], state["text_only"] = dict(skipped), text_only
                if writer.count >= samples_per_shard:
                    skip_log.flush()
                    writer.finish(end)
                if not bar.disable:
                    bar.set_postfix(
                        samples=_written(state) + writer.count, skipped=sum(skipped.values()), refresh=False
                    )
            skip_log.flush()
            writer.finish(end)
    finally:
        writer.close()
        bar.close()
        if pool is not None:
            pool.terminate()
    shards = [{"url": s["url"], "num_samples": s["num_samples"]} for s in state["shards"]]
    if not shards:
        raise ConvertError(f"{json_path}: no usable entries (see {skip_log_path})")
    index = {
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "source": {"json": state["json"], "image_roots": [str(r) for r in roots]},
        "skipped": dict(skipped),
        "text_only": text_only,
    }
    _write_json_atomic(out / "index.json", index)
    state["done"] = True
    _write_json_atomic(out / STATE_FILE, state)
    seconds = time.perf_counter() - start
    log.info(
        "%s: %d samples (%d text-only) in %d shards, %d skipped %s (ids in %s); %.1f s",
        out,
        index["num_samples"],
        text_only,
        len(shards),
        sum(skipped.values()),
        dict(skipped),
        skip_log_path,
        seconds,
    )
    return index


def _written(state: dict[str, Any]) -> int:
    return sum(s["num_samples"] for s in state["shards"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="LLaVA JSON (a list of {id, image?, conversations})")
    parser.add_argument(
        "--image-root",
        action="append",
        required=True,
        help="folder the 'image' paths are relative to (repeatable; first match wins)",
    )
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and index.json")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-checking processes (0: none)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        convert(
            args.json, args.image_root, args.out, args.samples_per_shard, args.workers, not args.no_progress
        )
    except ConvertError as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
