"""Silt's RecordBatch v2 codec against kafka-python's pure-Python one, in both directions.

kafka-python builds batches the way Kafka's Java producer does (base timestamp from the first
record, deltas from it), with two differences these tests account for: it writes 0 as the
partition leader epoch where the Java producer writes -1, and it falls back to an uncompressed
batch when compression does not shrink the records.

The `batchcat` example of silt-log is the Silt side: `decode` prints one JSON object per record,
`encode` turns JSON lines into one batch. Set SILT_BATCHCAT to use a prebuilt binary; otherwise
the test builds it with cargo.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

WORKSPACE_ROOT = Path(__file__).resolve().parents[2]

CODEC_NONE = DefaultRecordBatch.CODEC_NONE
CODEC_ZSTD = DefaultRecordBatch.CODEC_ZSTD
NAMES = {CODEC_NONE: "none", CODEC_ZSTD: "zstd"}
LOG_APPEND_TIME = DefaultRecordBatch.LOG_APPEND_TIME

# What a plain (non-idempotent) producer sends.
NO_PRODUCER = {"producer_id": -1, "producer_epoch": -1, "base_sequence": -1, "transactional": False}
# An idempotent, transactional producer partway through its sequence.
TRANSACTIONAL = {"producer_id": 4242, "producer_epoch": 7, "base_sequence": 1000, "transactional": True}

# Records that exercise what a codec can get wrong: null versus empty, binary bytes, repeated
# and non-ASCII header keys, null header values, timestamps out of order and before 1970.
RECORDS = [
    {"timestamp": 1_700_000_000_123, "key": b"sensor-1", "value": b'{"t": 21.5}', "headers": []},
    {"timestamp": 1_700_000_000_100, "key": None, "value": b"\x00\xff" * 40,
     "headers": [("trace", b"abc"), ("trace", None), ("\u00e9t\u00e9", b"")]},
    {"timestamp": 1_700_000_009_999, "key": b"", "value": None, "headers": [("n", None)]},
    {"timestamp": -5, "key": b"\x80" * 300, "value": b"x" * 1000, "headers": []},
]


@pytest.fixture(scope="session")
def batchcat():
    """Path of the batchcat binary: SILT_BATCHCAT, or built now with cargo."""
    prebuilt = os.environ.get("SILT_BATCHCAT")
    if prebuilt:
        return prebuilt
    build = subprocess.run(
        ["cargo", "build", "-p", "silt-log", "--example", "batchcat",
         "--message-format=json-render-diagnostics"],
        cwd=WORKSPACE_ROOT, stdout=subprocess.PIPE, check=True,
    )
    # Ask cargo where it put the binary rather than guessing the target directory.
    for line in build.stdout.decode().splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "batchcat":
            return message["executable"]
    pytest.fail("cargo build did not report a batchcat executable")


def run_batchcat(batchcat, args, stdin):
    result = subprocess.run([batchcat, *args], input=stdin, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def build_with_kafka_python(records, codec, producer):
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=codec, is_transactional=producer["transactional"],
        producer_id=producer["producer_id"], producer_epoch=producer["producer_epoch"],
        base_sequence=producer["base_sequence"], batch_size=1 << 20,
    )
    for offset, record in enumerate(records):
        metadata = builder.append(
            offset, timestamp=record["timestamp"], key=record["key"], value=record["value"],
            headers=record["headers"],
        )
        assert metadata is not None, "batch_size is large enough for every record"
    return bytes(builder.build())


def set_base_offset(batch, base_offset):
    """What a broker does on append: the base offset sits outside the CRC."""
    return struct.pack(">q", base_offset) + batch[8:]


def hex_or_none(data):
    return None if data is None else data.hex()


def to_json_lines(records):
    lines = [
        json.dumps({
            "timestamp": record["timestamp"],
            "key_hex": hex_or_none(record["key"]),
            "value_hex": hex_or_none(record["value"]),
            "headers": [[key, hex_or_none(value)] for key, value in record["headers"]],
        })
        for record in records
    ]
    return ("\n".join(lines) + "\n").encode()


def producer_args(producer):
    args = ["--producer-id", str(producer["producer_id"]),
            "--producer-epoch", str(producer["producer_epoch"]),
            "--base-sequence", str(producer["base_sequence"])]
    return args + (["--transactional"] if producer["transactional"] else [])


def decode_with_kafka_python(data):
    batch = DefaultRecordBatch(data)
    assert batch.validate_crc(), "kafka-python rejects the CRC"
    return batch, list(batch)


@pytest.mark.parametrize("codec", [CODEC_NONE, CODEC_ZSTD], ids=["none", "zstd"])
@pytest.mark.parametrize("producer", [NO_PRODUCER, TRANSACTIONAL], ids=["plain", "transactional"])
def test_silt_decodes_kafka_python_batches(batchcat, codec, producer):
    first = build_with_kafka_python(RECORDS, codec, producer)
    second = set_base_offset(build_with_kafka_python(RECORDS[:2], codec, producer), 1000)
    assert first[21 + 1] & 0x07 == codec, "kafka-python kept the compression"

    lines = run_batchcat(batchcat, ["decode"], first + second).decode().splitlines()
    decoded = [json.loads(line) for line in lines]

    expected = [(offset, record) for offset, record in enumerate(RECORDS)]
    expected += [(1000 + offset, record) for offset, record in enumerate(RECORDS[:2])]
    assert len(decoded) == len(expected)
    for got, (offset, record) in zip(decoded, expected):
        assert got["offset"] == offset
        assert got["timestamp"] == record["timestamp"]
        assert got["key_hex"] == hex_or_none(record["key"])
        assert got["value_hex"] == hex_or_none(record["value"])
        assert got["headers"] == [[key, hex_or_none(value)] for key, value in record["headers"]]
        assert got["producer_id"] == producer["producer_id"]
        assert got["producer_epoch"] == producer["producer_epoch"]
        assert got["base_sequence"] == producer["base_sequence"]
        assert got["is_transactional"] == producer["transactional"]
        assert got["compression"] == NAMES[codec]
        assert got["timestamp_type"] == "create_time"
        assert got["partition_leader_epoch"] == 0


@pytest.mark.parametrize("codec", [CODEC_NONE, CODEC_ZSTD], ids=["none", "zstd"])
@pytest.mark.parametrize("producer", [NO_PRODUCER, TRANSACTIONAL], ids=["plain", "transactional"])
def test_kafka_python_decodes_silt_batches(batchcat, codec, producer):
    args = ["encode", *producer_args(producer)] + (["--zstd"] if codec == CODEC_ZSTD else [])
    data = run_batchcat(batchcat, args, to_json_lines(RECORDS))

    batch, records = decode_with_kafka_python(data)
    assert batch.magic == 2
    assert batch.size_in_bytes == len(data)
    assert batch.compression_type == codec
    assert batch.timestamp_type == 0
    assert batch.is_transactional == producer["transactional"]
    assert batch.producer_id == producer["producer_id"]
    assert batch.producer_epoch == producer["producer_epoch"]
    assert batch.base_sequence == producer["base_sequence"]
    assert batch.leader_epoch == -1
    assert batch.first_timestamp == RECORDS[0]["timestamp"]
    assert batch.max_timestamp == max(record["timestamp"] for record in RECORDS)
    assert batch.last_offset_delta == len(RECORDS) - 1
    assert len(records) == len(RECORDS)
    for offset, (got, record) in enumerate(zip(records, RECORDS)):
        assert got.offset == offset
        assert got.timestamp == record["timestamp"]
        assert got.key == record["key"]
        assert got.value == record["value"]
        assert got.headers == list(record["headers"])


@pytest.mark.parametrize("producer", [NO_PRODUCER, TRANSACTIONAL], ids=["plain", "transactional"])
def test_uncompressed_batches_are_byte_identical(batchcat, producer):
    theirs = build_with_kafka_python(RECORDS, CODEC_NONE, producer)
    # kafka-python writes 0 where the Java producer writes -1; match it for the comparison.
    args = ["encode", "--partition-leader-epoch", "0", *producer_args(producer)]
    ours = run_batchcat(batchcat, args, to_json_lines(RECORDS))
    assert ours.hex() == theirs.hex()


def test_log_append_time_means_the_max_timestamp_for_every_record(batchcat):
    data = run_batchcat(batchcat, ["encode", "--log-append-time"], to_json_lines(RECORDS))
    batch, records = decode_with_kafka_python(data)
    assert batch.timestamp_type == LOG_APPEND_TIME
    latest = max(record["timestamp"] for record in RECORDS)
    assert [record.timestamp for record in records] == [latest] * len(RECORDS)

    ours = [json.loads(line) for line in run_batchcat(batchcat, ["decode"], data).splitlines()]
    assert [record["timestamp"] for record in ours] == [latest] * len(RECORDS)
    assert {record["timestamp_type"] for record in ours} == {"log_append_time"}


def test_batchcat_rejects_a_corrupted_kafka_python_batch(batchcat):
    data = bytearray(build_with_kafka_python(RECORDS, CODEC_NONE, NO_PRODUCER))
    data[-1] ^= 0x01
    result = subprocess.run([batchcat, "decode"], input=bytes(data), capture_output=True,
                            timeout=60)
    assert result.returncode != 0
    assert b"CRC" in result.stderr
    assert not DefaultRecordBatch(bytes(data)).validate_crc()
