"""confluent-kafka (librdkafka) against silt-core: an idempotent producer (InitProducerId,
sequence numbers) and a consumer group that commits and resumes."""

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_fixtures import wait_until

TIMEOUT = 60.0


def produce(bootstrap, topic, count, start=0, **config):
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, **config})
    delivered = []
    errors = []

    def report(error, message):
        if error is not None:
            errors.append(error)
        else:
            delivered.append((message.partition(), message.offset(), message.value()))

    for i in range(start, start + count):
        producer.produce(topic, key=b"k%d" % (i % 7), value=b"v%d" % i, on_delivery=report)
        producer.poll(0)
    assert producer.flush(TIMEOUT) == 0
    assert errors == []
    return delivered


def consume(bootstrap, topic, group, count):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got = []
    try:
        def more():
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                if message.error() and message.error().code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(message.error())
                if not message.error():
                    got.append((message.partition(), message.offset(), message.value()))
            return len(got) >= count
        wait_until(more, TIMEOUT, f"{count} records")
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return got


def test_idempotent_producer_and_group_consumer(core, kafka_topic):
    admin = AdminClient({"bootstrap.servers": core.bootstrap})
    futures = admin.create_topics([NewTopic(kafka_topic, num_partitions=2, replication_factor=1)])
    futures[kafka_topic].result(TIMEOUT)
    delivered = produce(core.bootstrap, kafka_topic, 200)
    assert len(delivered) == 200
    per_partition = {}
    for partition, offset, _ in delivered:
        per_partition.setdefault(partition, []).append(offset)
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets))), "dense offsets, no duplicates"

    group = f"{kafka_topic}-g"
    got = consume(core.bootstrap, kafka_topic, group, 200)
    assert sorted(value for _, _, value in got) == sorted(b"v%d" % i for i in range(200))

    # A second producer session appends after; the group resumes from its commit.
    produce(core.bootstrap, kafka_topic, 10, start=200)
    got = consume(core.bootstrap, kafka_topic, group, 10)
    assert sorted(value for _, _, value in got) == sorted(b"v%d" % i for i in range(200, 210))

    metrics = core.metrics()
    assert 'silt_kafka_requests_total{api="init_producer_id"}' in metrics
    assert "silt_kafka_produce_records_total" in metrics


def test_acknowledged_records_survive_kill_9(make_core, kafka_topic):
    # Delivery reports come only after the fsync: everything acknowledged before a kill -9
    # is there after the restart, once, in order.
    running = make_core()
    produce(running.bootstrap, kafka_topic, 5)
    running.restart(clean=False)
    produce(running.bootstrap, kafka_topic, 5, start=5)
    consumer = Consumer({"bootstrap.servers": running.bootstrap, "group.id": "x",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(kafka_topic, 0, 0)])
    got = []

    def ten():
        message = consumer.poll(0.2)
        if message is not None and not message.error():
            got.append(message.value())
        return len(got) >= 10

    try:
        wait_until(ten, TIMEOUT, "10 records")
    finally:
        consumer.close()
    assert got == [b"v%d" % i for i in range(10)]
