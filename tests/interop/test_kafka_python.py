"""kafka-python against silt-core: produce with acks=all, a two-member consumer group that
splits the partitions, committed offsets, resuming from them after a silt-core restart, and
the admin client's topics and configs."""

import threading

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError

from kafka_fixtures import wait_until

GROUP_TIMEOUT = 60.0


def produce(bootstrap, topic, count, start=0):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [producer.send(topic, key=b"k%d" % i, value=b"v%d" % i)
               for i in range(start, start + count)]
    producer.flush(timeout=30)
    metadata = [future.get(timeout=30) for future in futures]
    producer.close()
    return metadata


def create_topic(bootstrap, topic, partitions, configs=None):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs or {})])
    finally:
        admin.close()


def test_produce_acks_all_and_read_back_by_partition(core, kafka_topic):
    create_topic(core.bootstrap, kafka_topic, 3)
    metadata = produce(core.bootstrap, kafka_topic, 30)
    per_partition = {}
    for record in metadata:
        per_partition.setdefault(record.partition, []).append(record.offset)
    # Offsets are dense per partition, in send order.
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets)))
    consumer = KafkaConsumer(bootstrap_servers=core.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(kafka_topic, p) for p in range(3)])
    got = sorted((m.key, m.value) for m in consumer)
    consumer.close()
    assert got == sorted((b"k%d" % i, b"v%d" % i) for i in range(30))


def consume_in_group(bootstrap, topic, group, records, assignments, name, stop):
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             session_timeout_ms=10000, heartbeat_interval_ms=500)
    try:
        while not stop.is_set():
            for batch in consumer.poll(timeout_ms=200).values():
                for record in batch:
                    records.append((name, record.partition, record.offset))
            if consumer.assignment():
                assignments[name] = sorted(tp.partition for tp in consumer.assignment())
        consumer.commit()
    finally:
        consumer.close()


def test_two_member_group_splits_partitions_commits_and_resumes_after_restart(
        make_core, kafka_topic):
    running = make_core()
    create_topic(running.bootstrap, kafka_topic, 4)
    produce(running.bootstrap, kafka_topic, 40)
    group = f"{kafka_topic}-group"
    records = []
    assignments = {}
    stop = threading.Event()
    threads = [threading.Thread(target=consume_in_group,
                                args=(running.bootstrap, kafka_topic, group, records,
                                      assignments, name, stop))
               for name in ("a", "b")]
    for thread in threads:
        thread.start()

    def settled():
        # Everything consumed, and the group split: two members owning all four partitions.
        parts = assignments.get("a", []) + assignments.get("b", [])
        return len({(p, o) for _, p, o in records}) == 40 and assignments.get("a") \
            and assignments.get("b") and sorted(parts) == [0, 1, 2, 3]

    try:
        wait_until(settled, GROUP_TIMEOUT, "the group to split the partitions and consume all")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=GROUP_TIMEOUT)
    # Every record of the four partitions was consumed (a record may be read twice when a
    # rebalance moves its partition before a commit, as Kafka's at-least-once allows).
    offsets_per_partition = {}
    for _, partition, offset in records:
        offsets_per_partition.setdefault(partition, set()).add(offset)
    assert sum(len(offsets) for offsets in offsets_per_partition.values()) == 40
    assert all(offsets == set(range(len(offsets))) for offsets in offsets_per_partition.values())

    # Both members left: the group is known (it has offsets) and has no members.
    admin = KafkaAdminClient(bootstrap_servers=running.bootstrap)
    try:
        listed = {g["group_id"]: g["group_state"] for g in admin.list_groups()}
        assert listed[group] == "Empty", listed
        described = admin.describe_groups([group])[group]
        assert (described["group_state"], described["members"]) == ("Empty", []), described
    finally:
        admin.close()

    # Committed offsets survive a restart: a new member of the group starts after them.
    running.restart()
    produce(running.bootstrap, kafka_topic, 8, start=40)
    consumer = KafkaConsumer(kafka_topic, bootstrap_servers=running.bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=8000)
    after = []
    for record in consumer:
        after.append(record.value)
        if len(after) == 8:
            break
    committed = {p: consumer.committed(TopicPartition(kafka_topic, p)) for p in range(4)}
    consumer.close()
    assert sorted(after) == sorted(b"v%d" % i for i in range(40, 48))
    assert sum(committed.values()) == 40, committed


def test_admin_topics_and_configs(core, kafka_topic):
    admin = KafkaAdminClient(bootstrap_servers=core.bootstrap)
    try:
        admin.create_topics([NewTopic(kafka_topic, 2, 1,
                                      topic_configs={"retention.ms": "3600000"})])
        with pytest.raises(TopicAlreadyExistsError):
            admin.create_topics([NewTopic(kafka_topic, 2, 1)])
        assert kafka_topic in admin.list_topics()
        resource = ConfigResource(ConfigResourceType.TOPIC, kafka_topic)

        def configs(config_filter):
            described = admin.describe_configs([resource], config_filter=config_filter)
            return {key: entry["value"]
                    for key, entry in described["topic"][kafka_topic].items()}

        assert configs("modified") == {"retention.ms": "3600000"}
        every = configs("all")
        assert every["retention.ms"] == "3600000"
        assert every["cleanup.policy"] == "delete"
        assert every["segment.bytes"] == str(1 << 30)
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, kafka_topic,
                                            configs={"retention.bytes": "1048576"})])
        # kafka-python 3 keeps the other overrides (it sends them along).
        assert configs("modified") == {"retention.bytes": "1048576", "retention.ms": "3600000"}
        refused = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, kafka_topic,
                                                      configs={"cleanup.policy": "compact"})])
        message = refused["topic"][kafka_topic]
        assert "InvalidConfigurationError" in message and "compaction" in message, message
        assert configs("all")["cleanup.policy"] == "delete"
        admin.delete_topics([kafka_topic])
        wait_until(lambda: kafka_topic not in admin.list_topics(), 30, "the topic to go")
    finally:
        admin.close()
