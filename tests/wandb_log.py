"""Reading an offline wandb run back, for the tests: its transaction log parsed."""

import json
import struct
import zlib
from pathlib import Path


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's transaction log (run-<id>.wandb).

    The file is a 7-byte header (':W&B', magic 0xBEE1, version 0) then LevelDB-style log blocks of
    32 KiB: each chunk has a header (CRC-32 of type+data, uint16 length, uint8 type: 1 full,
    2 first, 3 middle, 4 last); a block tail shorter than a header is zero padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_run(run_dir: Path) -> dict:
    """The one offline run under <run_dir>/wandb: its folder, record kinds, run header, config,
    history (key -> values in order), summary and logged artifacts. Call wandb.teardown() first:
    run.finish() returns before wandb's service has written the log."""
    (folder,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    (log_file,) = folder.glob("run-*.wandb")
    records = wandb_records(log_file)

    def key(item) -> str:
        return "/".join([item.key, *item.nested_key]).strip("/")

    found = {"folder": folder, "kinds": [], "config": {}, "history": {}, "summary": {}}
    found["artifacts"] = []
    for r in records:
        kind = r.WhichOneof("record_type")
        found["kinds"].append(kind)
        if kind == "run":
            found["header"] = r.run
        elif kind == "config":
            found["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            for item in r.history.item:
                found["history"].setdefault(key(item), []).append(json.loads(item.value_json))
        elif kind == "summary":
            found["summary"].update({key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            found["artifacts"].append(r.artifact)
    return found
