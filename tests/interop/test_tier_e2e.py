"""Tiered storage end to end through the real silt-core and its own offload loop, for each of
two object stores: a `file://` directory and moto's S3 server (`s3://bucket/prefix` reached with
AWS_ENDPOINT_URL and AWS_ALLOW_HTTP, as an operator's S3-compatible endpoint would be).

A topic with a small hot tier (64 KiB segments, local.retention.ms=0, offload as soon as a
segment closes) is fed 100,000 records with confluent-kafka (keys, some null; headers on most;
explicit timestamps) across 3 partitions. Once the core has archived every closed segment and
deleted it locally, so each partition holds only its active segment on disk:
- kcat replays every partition from offset 0 byte for byte (offset, key, value, headers,
  timestamp), across both tiers;
- confluent-kafka's offsets_for_times finds an archived record by its timestamp, and a consumer
  assigned there reads on across the tier boundary to the end;
- a kafka-python consumer group (auto_offset_reset=earliest) gets every record exactly once;
- pyarrow and DuckDB read the Parquet archive in place with Hive partitioning (in the bucket,
  DuckDB reads through s3fs, an fsspec filesystem: its httpfs extension is not on PyPI for this
  DuckDB) and see the rows the consumers saw at the same offsets, and nothing else (no
  duplicate or orphaned object).

The waits are on conditions: the admin /v1/tier/status/<topic> answer and the partition's
segment files. The reads start only once the local start can no longer move (no closed segment
is left to archive and nothing more is produced)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import s3fs
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaConsumer

import kafka_fixtures
import s3_fixtures
from kafka_fixtures import wait_until

RECORDS = 100_000
PARTITIONS = 3
SEGMENT_BYTES = 64 << 10
# How long offload may take to archive the whole topic on a loaded 2-core machine.
TIER_TIMEOUT = 120.0
# How long one client may take to read the whole topic.
READ_TIMEOUT = 120.0
BUCKET = "silt-e2e"
PREFIX = "archive"
KCAT = shutil.which("kcat") or "/usr/bin/kcat"
KCAT_FORMAT = "%o|%k|%s|%h|%T\n"


def tier_flags(store_url):
    """Small segments, offload as soon as one closes (objects of about 512 KiB, so a partition
    has several), checks and retries every 100 ms, and a hot tier of only what is not archived."""
    settings = [
        f"topic_defaults.segment.bytes={SEGMENT_BYTES}",
        "topic_defaults.local.retention.ms=0",
        "tiering.max_wait_ms=0",
        "tiering.object_bytes_target=512KiB",
        "tiering.check_interval_ms=100",
        "tiering.retry_initial_ms=100",
        "tiering.retry_max_ms=400",
        "log.retention_check_ms=100",
        # The records are an hour old, so compaction would merge the small objects while the
        # engines list and read them; it has its own tests (tiering/tests/compact.rs).
        "tiering.compact=false",
    ]
    flags = ["--object-store", store_url]
    for setting in settings:
        flags += ["--set", setting]
    return flags


class Records:
    """The records produced: record i goes to partition i % 3 with timestamp base + i, so each
    partition's timestamps rise strictly and record i is at offset i // 3 there."""

    def __init__(self, base_ts):
        self.base_ts = base_ts

    @staticmethod
    def key(i):
        return None if i % 50 == 0 else b"dev-%02d" % (i % 37)

    @staticmethod
    def value(i):
        return b'{"i":%d,"temp":%d.%d,"ok":%s}%s' % (
            i, (i * 7) % 40, i % 10, b"true" if i % 2 else b"false", b"x" * (i % 13))

    @staticmethod
    def headers(i):
        if i % 4 == 0:
            return []
        return [("src", b"edge-%d" % (i % 5)), ("seq", b"%d" % i)]

    def timestamp(self, i):
        return self.base_ts + i

    def index(self, partition, offset):
        return offset * PARTITIONS + partition

    def count(self, partition):
        return len(range(partition, RECORDS, PARTITIONS))

    def expected(self, partition, offset):
        """(key, value, timestamp ms, headers) of the record at `offset` of `partition`."""
        i = self.index(partition, offset)
        return (self.key(i), self.value(i), self.timestamp(i), self.headers(i))

    def kcat_lines(self, partition, start=0):
        lines = []
        for offset in range(start, self.count(partition)):
            key, value, timestamp, headers = self.expected(partition, offset)
            header_text = b",".join(b"%s=%s" % (name.encode(), data) for name, data in headers)
            lines.append(b"%d|%s|%s|%s|%d\n" % (offset, key or b"", value, header_text, timestamp))
        return b"".join(lines)


def produce(bootstrap, topic, records):
    # One request in flight per connection: retries cannot reorder, so record i lands at
    # offset i // 3 of partition i % 3 (checked below from the delivery reports).
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                        "batch.size": 32768, "max.in.flight.requests.per.connection": 1,
                        "enable.idempotence": False, "queue.buffering.max.messages": RECORDS})
    failures = []
    delivered = [0] * PARTITIONS

    def report(error, message):
        if error is not None:
            failures.append(error)
            return
        i = int(json.loads(message.value().split(b"}")[0] + b"}")["i"])
        if (message.partition(), message.offset()) != (i % PARTITIONS, i // PARTITIONS):
            failures.append(f"record {i} at {message.partition()}/{message.offset()}")
        delivered[message.partition()] += 1

    for i in range(RECORDS):
        while True:
            try:
                producer.produce(topic, partition=i % PARTITIONS, key=records.key(i),
                                 value=records.value(i), headers=records.headers(i),
                                 timestamp=records.timestamp(i), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(READ_TIMEOUT) == 0, "records still unsent after the flush"
    assert not failures, failures[:10]
    assert delivered == [records.count(p) for p in range(PARTITIONS)], delivered


def create_topic(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        future.result(timeout=30)


def tier_status(core, topic):
    status, body = core.admin_get(f"/v1/tier/status/{topic}")
    assert status == 200, f"/v1/tier/status/{topic}: {status} {body}"
    return json.loads(body)


def local_segments(core, topic, partition):
    """Base offsets of the partition's segment files on disk (the log keeps a partition in
    `<topic>/<partition>/` under its data directory)."""
    topic_dirs = [path for path in core.data_dir.rglob(topic) if path.is_dir()]
    assert len(topic_dirs) == 1, topic_dirs
    return sorted(int(path.stem) for path in (topic_dirs[0] / str(partition)).glob("*.log"))


def wait_archived(core, topic, records):
    """Waits until every closed segment is archived and deleted locally: each partition has
    only its active segment on disk, starting where the archive ends. Nothing more is
    produced, so the local start stays there. Returns the last status."""

    def settled():
        status = tier_status(core, topic)
        partitions = status["partitions"]
        for p in partitions:
            part = p["partition"]
            if p["high_watermark"] != records.count(part) or p["last_error"] is not None:
                return None
            if p["archived_next_offset"] is None or p["log_start_offset"] != 0:
                return None
            if p["local_start_offset"] != p["archived_next_offset"]:
                return None
            if local_segments(core, topic, part) != [p["local_start_offset"]]:
                return None
        return status if len(partitions) == PARTITIONS else None

    try:
        status = wait_until(settled, TIER_TIMEOUT, "the archive to hold every closed segment")
    except AssertionError:
        raise AssertionError(f"last status {tier_status(core, topic)}; local segments "
                             f"{[local_segments(core, topic, p) for p in range(PARTITIONS)]}")
    for p in status["partitions"]:
        # Most of the partition is archived, and the local start is well past 0.
        assert p["local_start_offset"] > records.count(p["partition"]) * 0.8, p
        assert p["archived_objects"] >= 2, p
    return status


def kcat_replay(core, topic, partition):
    args = [KCAT, "-b", core.bootstrap, "-C", "-t", topic, "-p", str(partition), "-o", "0",
            "-e", "-q", "-f", KCAT_FORMAT]
    try:
        result = subprocess.run(args, capture_output=True, timeout=READ_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        lines = (error.stdout or b"").count(b"\n")
        raise AssertionError(
            f"kcat hung replaying partition {partition}: got {lines} lines; tier status "
            f"{tier_status(core, topic)}; core stderr tail:\n" + "\n".join(core.stderr[-50:]))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def first_difference(got, want):
    got_lines, want_lines = got.split(b"\n"), want.split(b"\n")
    for index, (a, b) in enumerate(zip(got_lines, want_lines)):
        if a != b:
            return f"line {index}: got {a!r}, want {b!r}"
    return f"{len(got_lines)} lines, want {len(want_lines)}"


def headers_of(pairs):
    return [(name, bytes(data)) for name, data in (pairs or [])]


def read_from_timestamp(core, topic, records, partition, archive_end):
    """offsets_for_times at an archived record's timestamp, then a consumer assigned there
    reads across the tier boundary to the end of the partition."""
    offset = archive_end // 2
    timestamp = records.expected(partition, offset)[2]
    consumer = Consumer({"bootstrap.servers": core.bootstrap, "group.id": f"{topic}-times",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    try:
        # A record's own timestamp finds it; one just after (between two records' timestamps)
        # finds the next. One lookup per call: librdkafka merges a partition named twice.
        for query, want in [(timestamp, offset), (timestamp + 1, offset + 1)]:
            found = consumer.offsets_for_times([TopicPartition(topic, partition, query)],
                                               timeout=30)
            assert [(tp.partition, tp.offset) for tp in found] == [(partition, want)], found
        consumer.assign([TopicPartition(topic, partition, offset)])
        end = records.count(partition)
        next_offset = offset
        deadline = time.monotonic() + READ_TIMEOUT
        while next_offset < end:
            assert time.monotonic() < deadline, (
                f"confluent consumer stuck at {partition}/{next_offset}; tier status "
                f"{tier_status(core, topic)}")
            for message in consumer.consume(num_messages=1000, timeout=1.0):
                if message.error():
                    raise KafkaException(message.error())
                assert message.offset() == next_offset, (message.offset(), next_offset)
                got = (message.key(), message.value(), message.timestamp()[1],
                       headers_of(message.headers()))
                assert got == records.expected(partition, next_offset), next_offset
                next_offset += 1
    finally:
        consumer.close()


def consume_group(core, topic):
    """Everything a kafka-python group member reads from the earliest offsets:
    {(partition, offset): (key, value, timestamp, headers)}, each offset exactly once."""
    consumer = KafkaConsumer(topic, bootstrap_servers=core.bootstrap, group_id=f"{topic}-group",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             max_poll_records=5000, fetch_max_bytes=8 << 20)
    seen = {}
    duplicates = []
    try:
        deadline = time.monotonic() + READ_TIMEOUT
        while len(seen) < RECORDS:
            assert time.monotonic() < deadline, (
                f"kafka-python group read {len(seen)} of {RECORDS}; tier status "
                f"{tier_status(core, topic)}")
            for batch in consumer.poll(timeout_ms=500).values():
                for message in batch:
                    place = (message.partition, message.offset)
                    if place in seen:
                        duplicates.append(place)
                    seen[place] = (message.key, message.value, message.timestamp,
                                   headers_of(message.headers))
        consumer.commit()
    finally:
        consumer.close()
    assert not duplicates, duplicates[:10]
    return seen


def check_archive_rows(rows, consumed, status, engine):
    """`rows` (partition, offset, key, value, timestamp ms, headers) from an analytics engine
    are exactly the archived offsets of each partition, each as the consumers saw it."""
    archive_end = {p["partition"]: p["archived_next_offset"] for p in status["partitions"]}
    by_partition = {p: [] for p in range(PARTITIONS)}
    for row in rows:
        by_partition[row[0]].append(row)
    for partition, part_rows in by_partition.items():
        offsets = [row[1] for row in part_rows]
        assert offsets == list(range(archive_end[partition])), (
            f"{engine}: partition {partition} has {len(offsets)} rows, archive ends at "
            f"{archive_end[partition]}")
        for _, offset, key, value, timestamp, headers in part_rows:
            assert (key, value, timestamp, headers) == consumed[(partition, offset)], (
                f"{engine}: partition {partition} offset {offset}")


def duckdb_rows(base, filesystem=None):
    """The archive's rows as DuckDB reads them under `base` (a directory, or an s3:// URL
    read through `filesystem`, an fsspec one: DuckDB's own httpfs extension is not on PyPI for
    this DuckDB, and it may not download extensions here)."""
    glob = f"{base}/v1/**/*.parquet"
    query = f"""
        SELECT "partition", "offset", "key", "value", epoch_ms("timestamp"), "headers", "topic"
        FROM read_parquet('{glob}', hive_partitioning = true)
        ORDER BY "partition", "offset"
    """
    connection = duckdb.connect()
    if filesystem is not None:
        connection.register_filesystem(filesystem)
    rows = connection.execute(query).fetchall()
    return [(int(partition), offset, key, value, timestamp,
             [(h["key"], h["value"]) for h in headers], topic)
            for partition, offset, key, value, timestamp, headers, topic in rows]


def pyarrow_rows(filesystem, base):
    dataset = pads.dataset(base, format="parquet", partitioning="hive", filesystem=filesystem)
    table = dataset.to_table(columns=["partition", "offset", "key", "value", "timestamp",
                                      "headers", "topic"])
    columns = table.to_pydict()
    rows = []
    for index in range(table.num_rows):
        timestamp = columns["timestamp"][index]
        rows.append((int(columns["partition"][index]), columns["offset"][index],
                     columns["key"][index], columns["value"][index],
                     int(timestamp.timestamp() * 1000),
                     [(h["key"], h["value"]) for h in columns["headers"][index]],
                     columns["topic"][index]))
    rows.sort(key=lambda row: (row[0], row[1]))
    return rows


@dataclasses.dataclass
class Store:
    """An object store the core archives to, and how the analytics engines reach it."""
    url: str
    core_env: dict
    arrow_fs: pafs.FileSystem
    # The archive's `v1` directory, as `arrow_fs` names it.
    arrow_base: str
    # The local directory (file:// only), and the moto server (moto only).
    objects_dir: Path | None = None
    moto: s3_fixtures.Moto | None = None


@pytest.fixture(params=["file", "moto"])
def store(request, tmp_path):
    if request.param == "file":
        objects = tmp_path / "objects"
        yield Store(url=f"file://{objects}", core_env={}, arrow_fs=pafs.LocalFileSystem(),
                    arrow_base=str(objects / "v1"), objects_dir=objects)
        return
    with s3_fixtures.moto_server(tmp_path) as moto:
        moto.create_bucket(BUCKET)
        arrow_fs = pafs.S3FileSystem(
            access_key=s3_fixtures.ACCESS_KEY, secret_key=s3_fixtures.SECRET_KEY,
            region=s3_fixtures.REGION, endpoint_override=f"127.0.0.1:{moto.port}",
            scheme="http")
        yield Store(url=f"s3://{BUCKET}/{PREFIX}", core_env=moto.env(), arrow_fs=arrow_fs,
                    arrow_base=f"{BUCKET}/{PREFIX}/v1", moto=moto)


def test_100k_records_replay_exactly_across_tiers_and_the_archive_reads_in_place(
        store, tmp_path, kafka_topic):
    core = kafka_fixtures.Core(tmp_path / "data", *tier_flags(store.url), env=store.core_env)
    try:
        records = Records(int(time.time() * 1000) - 3_600_000)
        create_topic(core.bootstrap, kafka_topic)
        started = time.monotonic()
        produce(core.bootstrap, kafka_topic, records)
        produced = time.monotonic()
        status = wait_archived(core, kafka_topic, records)
        archived = time.monotonic()
        print(f"\n{store.url}: produced {RECORDS} in {produced - started:.1f}s, archived in "
              f"{archived - produced:.1f}s more; {status}")

        # kcat: every partition from offset 0, across both tiers, byte for byte.
        for partition in range(PARTITIONS):
            got = kcat_replay(core, kafka_topic, partition)
            want = records.kcat_lines(partition)
            assert got == want, f"kcat partition {partition}: {first_difference(got, want)}"

        # confluent-kafka: a timestamp inside the archive, then on across the tier boundary.
        for p in status["partitions"]:
            read_from_timestamp(core, kafka_topic, records, p["partition"],
                                p["archived_next_offset"])

        # kafka-python: a group from the earliest offsets gets everything, once.
        consumed = consume_group(core, kafka_topic)
        for (partition, offset), got in consumed.items():
            assert got == records.expected(partition, offset), (partition, offset)
        read = time.monotonic()

        # The archive in place: exactly the archived offsets, as the consumers saw them.
        engines = [("pyarrow", pyarrow_rows(store.arrow_fs, store.arrow_base))]
        if store.objects_dir is not None:
            engines.append(("duckdb", duckdb_rows(store.objects_dir)))
        else:
            bucket = s3fs.S3FileSystem(
                key=s3_fixtures.ACCESS_KEY, secret=s3_fixtures.SECRET_KEY,
                endpoint_url=store.moto.endpoint,
                client_kwargs={"region_name": s3_fixtures.REGION})
            engines.append(("duckdb over S3", duckdb_rows(f"s3://{BUCKET}/{PREFIX}", bucket)))
        for engine, rows in engines:
            assert {row[6] for row in rows} == {kafka_topic}, engine
            check_archive_rows([row[:6] for row in rows], consumed, status, engine)
        if store.moto is not None:
            # The archive really is in the bucket: manifests and objects under the prefix.
            keys = store.moto.list_keys(BUCKET, PREFIX + "/")
            assert any(key.startswith(f"{PREFIX}/_manifests/") for key in keys), keys[:20]
            parquet = [key for key in keys if key.endswith(".parquet")]
            assert len(parquet) == sum(p["archived_objects"] for p in status["partitions"])
        print(f"read by three clients in {read - archived:.1f}s, "
              f"archive checked in {time.monotonic() - read:.1f}s")
    finally:
        core.stop()
