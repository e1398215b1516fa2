"""Read an offline W&B run (`<run dir>/wandb/offline-run-*/run-*.wandb`) without a network.

The file is a LevelDB-style log of protobuf `Record`s: a 7-byte header (":W&B", magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/
middle/last). This is what `wandb sync` uploads; reading it lets tests and scripts check what
a run logged.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # the rest of a block too small for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Config, history rows and summary of an offline run directory (offline-run-*)."""
    files = list(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file in {run_dir}")
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "name": None}
    for record in iter_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group)
            run["tags"] = list(record.run.tags)
            items = record.run.config.update
            run["config"].update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            run["history"].append(row)
        elif kind == "summary":
            for i in record.summary.update:
                run["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return run
