"""A message's arrays travel as one: fewer objects through Flower's object store, the same bytes.

Flower 1.42 moves a message as a tree of objects, one per array (and one per 5 MB chunk of it), each
fetched with its own request at every hop: SuperLink to SuperNode, SuperNode to the ClientApp, and
back. A UNet-ResNet34 has 230 arrays, so a round's model crossed ~470 objects each way per hop, and on
loopback the requests (not the bytes) were most of a deployed round (docs/PERFORMANCE.md "Deployed
round vs simulated round"). :func:`pack_content` puts every array of each multi-array
:class:`ArrayRecord` into one uint8 array (their serialized bytes end to end, ~20 chunks for 97 MB) and
records each array's key, dtype, shape, serialization type and length in a config record;
:func:`unpack_content` restores the very same arrays, byte for byte. The server's grid packs what it
sends and unpacks what it receives (``fedseg/server/grids.py``), and the vehicle's outermost mod does
the reverse (``fedseg/clients/mods.py``), in both engines, so everything between sees the arrays as
before and nothing measured changes.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED = "fedseg.packed"  # config record: which array records are packed (its key "records")
_LAYOUT = "fedseg.packed."  # + record name: that record's layout


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with each array record of two or more arrays packed into one array; the same object
    when there is nothing to pack."""
    names = [name for name, record in content.array_records.items() if len(record) > 1]
    if not names:
        return content
    packed = RecordDict()
    for name, record in content.items():
        if name in names:
            arrays = [cast(Array, record[key]) for key in record]
            record = cast(ArrayRecord, record)
            data = b"".join(a.data for a in arrays)
            packed[name] = ArrayRecord({"packed": Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)})
            packed[_LAYOUT + name] = ConfigRecord({
                "keys": list(record.keys()), "dtypes": [a.dtype for a in arrays], "stypes": [a.stype for a in arrays],
                "lengths": [len(a.data) for a in arrays], "ranks": [len(a.shape) for a in arrays],
                "dims": [int(d) for a in arrays for d in a.shape]})
        else:
            packed[name] = record
    packed[PACKED] = ConfigRecord({"records": names})
    return packed


def unpack_content(content: RecordDict) -> RecordDict:
    """The content :func:`pack_content` packed, as it was; any other content unchanged."""
    if PACKED not in content.config_records:
        return content
    names = set(cast(list[str], content.config_records[PACKED]["records"]))
    unpacked = RecordDict()
    for name, record in content.items():
        if name == PACKED or name.startswith(_LAYOUT):
            continue
        if name not in names:
            unpacked[name] = record
            continue
        layout = content.config_records[_LAYOUT + name]
        data = cast(Array, cast(ArrayRecord, record)["packed"]).data
        dims = iter(cast(list[int], layout["dims"]))
        arrays, start = {}, 0
        for key, dtype, stype, length, rank in zip(
                cast(list[str], layout["keys"]), cast(list[str], layout["dtypes"]), cast(list[str], layout["stypes"]),
                cast(list[int], layout["lengths"]), cast(list[int], layout["ranks"]), strict=True):
            shape = tuple(next(dims) for _ in range(rank))
            arrays[key] = Array(dtype=dtype, shape=shape, stype=stype, data=data[start:start + length])
            start += length
        unpacked[name] = ArrayRecord(arrays)
    return unpacked
