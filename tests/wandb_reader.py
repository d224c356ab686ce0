"""Read an offline wandb run file (.wandb): LevelDB-style log blocks holding protobuf Records.

Used by tests to check what the wandb logger wrote (config keys, summary keys, tables) with no server.
"""
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ':W&B' + magic (2 bytes) + version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    out, pos, parts = [], HEADER, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            out.append(b"".join(parts + [chunk]))
        elif kind == 0 and length == 0:
            break
    return out


def read_run(path: Path) -> dict:
    """{'config': {key: json}, 'summary': {key: json}, 'history_keys': set, 'kinds': {record type: count}}"""
    from wandb.proto import wandb_internal_pb2 as pb

    res = {"config": {}, "summary": {}, "history_keys": set(), "kinds": {}}
    for raw in raw_records(path):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        res["kinds"][kind] = res["kinds"].get(kind, 0) + 1
        if kind == "run":  # the config given to wandb.init travels in the run record
            res["config"].update({it.key or ".".join(it.nested_key): it.value_json for it in r.run.config.update})
            res["run"] = {"group": r.run.run_group, "tags": list(r.run.tags), "project": r.run.project}
        elif kind == "config":
            res["config"].update({it.key or ".".join(it.nested_key): it.value_json for it in r.config.update})
        elif kind == "summary":
            res["summary"].update({it.key or ".".join(it.nested_key): it.value_json for it in r.summary.update})
        elif kind == "history":
            res["history_keys"].update(it.key or ".".join(it.nested_key) for it in r.history.item)
    return res
