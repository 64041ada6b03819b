"""kcat (librdkafka) against silt-core: produce, consume, metadata (-L) and offsets by time
(-Q), all through an unmodified librdkafka."""

import json
import shutil
import subprocess

import pytest

KCAT = shutil.which("kcat") or "/usr/bin/kcat"
TIMEOUT = 60


def kcat(*args, input=None):
    result = subprocess.run([KCAT, *args], input=input, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, f"kcat {args}: {result.stderr}"
    return result.stdout


def test_produce_then_consume_keys_values_and_offsets(core, kafka_topic):
    lines = "".join(f"key{i % 3}:value {i}\n" for i in range(50))
    kcat("-b", core.bootstrap, "-P", "-t", kafka_topic, "-K:", "-X", "acks=all", input=lines)
    out = kcat("-b", core.bootstrap, "-C", "-t", kafka_topic, "-e", "-J")
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["key"], r["payload"], r["offset"]) for r in records] == [
        (f"key{i % 3}", f"value {i}", i) for i in range(50)
    ]
    assert all(r["partition"] == 0 for r in records)

    # A consumer starting at an offset gets exactly the rest.
    out = kcat("-b", core.bootstrap, "-C", "-t", kafka_topic, "-o", "45", "-e", "-f", "%o\n")
    assert out.split() == [str(i) for i in range(45, 50)]


def test_metadata_lists_the_broker_and_auto_created_topics(make_core, kafka_topic):
    running = make_core("--set", "kafka.default_partitions=3")
    kcat("-b", running.bootstrap, "-P", "-t", kafka_topic, input="x\n")
    out = kcat("-b", running.bootstrap, "-L", "-J")
    metadata = json.loads(out)
    assert [(b["id"], b["name"]) for b in metadata["brokers"]] == [(1, running.bootstrap)]
    topics = {t["topic"]: t for t in metadata["topics"]}
    assert set(topics) == {kafka_topic}, "internal topics stay hidden"
    partitions = topics[kafka_topic]["partitions"]
    assert [p["partition"] for p in partitions] == [0, 1, 2]
    assert all(p["leader"] == 1 and p["isrs"] == [{"id": 1}] for p in partitions)


def test_offsets_by_time_and_the_ends(core, kafka_topic):
    lines = "".join(f"v{i}\n" for i in range(5))
    kcat("-b", core.bootstrap, "-P", "-t", kafka_topic, input=lines)
    out = kcat("-b", core.bootstrap, "-C", "-t", kafka_topic, "-e", "-f", "%T %o\n")
    stamps = [tuple(map(int, line.split())) for line in out.splitlines()]
    assert [offset for _, offset in stamps] == list(range(5))
    # -Q: the first offset at or after a time; a time after everything gives the end (-1).
    first_time = stamps[0][0]
    out = kcat("-b", core.bootstrap, "-Q", "-t", f"{kafka_topic}:0:{first_time}")
    assert f"{kafka_topic} [0] offset 0" in out, out
    out = kcat("-b", core.bootstrap, "-Q", "-t", f"{kafka_topic}:0:{first_time + 10**9}")
    assert f"{kafka_topic} [0] offset -1" in out, out


def test_consuming_from_the_end_waits_for_new_records(core, kafka_topic):
    kcat("-b", core.bootstrap, "-P", "-t", kafka_topic, input="old\n")
    consumer = subprocess.Popen(
        [KCAT, "-b", core.bootstrap, "-C", "-t", kafka_topic, "-o", "end", "-c", "1",
         "-f", "%s\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Produce until the consumer, which starts at the end, sees one: it may subscribe
        # after the first of these, so it waits (long poll) for a later one.
        for attempt in range(100):
            kcat("-b", core.bootstrap, "-P", "-t", kafka_topic, input=f"new{attempt}\n")
            try:
                out, _ = consumer.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("the consumer at the end never received a new record")
        assert out.startswith("new"), out
    finally:
        consumer.kill()
        consumer.wait()
