"""aiokafka (pure-Python asyncio client) against silt-core: produce with acks=all, a consumer
group that commits, and a second consumer of the group resuming from the commit."""

import asyncio

import pytest

aiokafka = pytest.importorskip("aiokafka", reason="aiokafka is in requirements.txt")

TIMEOUT = 60.0


async def produce(bootstrap, topic, start, count):
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send_and_wait(topic, key=b"k", value=b"v%d" % i)
                for i in range(start, start + count)]
    finally:
        await producer.stop()
    return [(meta.partition, meta.offset) for meta in sent]


async def consume(bootstrap, topic, group, count):
    consumer = aiokafka.AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                         auto_offset_reset="earliest",
                                         enable_auto_commit=False)
    await consumer.start()
    got = []
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(got) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    got.extend(record.value for record in records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


def test_produce_consume_commit_and_resume(core, kafka_topic):
    async def scenario():
        sent = await produce(core.bootstrap, kafka_topic, 0, 20)
        assert sent == [(0, i) for i in range(20)]
        group = f"{kafka_topic}-g"
        assert await consume(core.bootstrap, kafka_topic, group, 20) == \
            [b"v%d" % i for i in range(20)]
        await produce(core.bootstrap, kafka_topic, 20, 5)
        assert await consume(core.bootstrap, kafka_topic, group, 5) == \
            [b"v%d" % i for i in range(20, 25)]

    asyncio.run(scenario())
