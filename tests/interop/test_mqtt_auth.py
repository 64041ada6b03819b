"""Authentication and authorisation: users from a mosquitto_passwd file, anonymous access off,
and per-topic ACLs (deny and allow, publish and subscribe, per user and for any user with %u),
with the reason codes the spec gives: a refused subscription gets 0x87 in 5.0 and 0x80 in
3.1.1, a refused 5.0 QoS 1 publish gets PUBACK 0x87.

The same rules are written in each broker's ACL format. Mosquitto's grants `read` (subscribe
and receive) and `write` (publish); silt's names subscribe and publish, first match wins, and
no match is a deny.
"""

import subprocess

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS

USERS = {"alice": "alice-secret", "bob": "bob-secret", "admin": "admin-secret"}

ACL_SILT = """\
# Silt: allow|deny  publish|subscribe|all  user:<name>|client:<id>|any  <filter>
deny   subscribe  user:bob     sensors/private/#
allow  subscribe  user:bob     sensors/#
allow  publish    user:alice   sensors/#
allow  all        any          users/%u/#
allow  all        user:admin   #
"""

ACL_MOSQUITTO = """\
pattern readwrite users/%u/#

user bob
topic deny sensors/private/#
topic read sensors/#

user alice
topic write sensors/#

user admin
topic readwrite #
"""


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secured")
    passwords = fx.make_password_file(workdir / "passwords", USERS)
    running = fx.Broker(workdir, fx.BrokerOptions(
        allow_anonymous=False, password_file=passwords,
        acl_silt=ACL_SILT, acl_mosquitto=ACL_MOSQUITTO))
    yield running
    running.stop()


def login(mqtt, broker, user, version=V5, **kwargs):
    return mqtt.raw(version, broker=broker, username=user, password=USERS[user], **kwargs)


# ---- authentication -------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_logs_in_with_a_password(mqtt, secured, version):
    client = mqtt.paho(version, broker=secured, username="alice", password=USERS["alice"])
    assert client.connack[1] == 0


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_pub_logs_in_with_a_password(secured, version):
    fx.run_pub(secured, version, "-u", "alice", "-P", USERS["alice"], "-t", "sensors/t",
               "-m", "x", "-q", "1")


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_bad_credentials_are_refused(mqtt, secured, version, who):
    """5.0: CONNACK 0x86 (Bad User Name or Password) or 0x87 (Not authorized); 3.1.1:
    return code 4 or 5. Then the connection is closed."""
    client = mqtt.raw_unconnected(version, broker=secured)
    user = "alice" if who == "wrong-password" else "mallory"
    connack = client.connect(username=user, password="nope", expect_code=None)
    assert connack.code in ((0x86, 0x87) if version == V5 else (4, 5))
    assert not connack.session_present
    client.wait_closed()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_anonymous_is_refused_when_not_allowed(mqtt, secured, version):
    """5.0: 0x87 (Not authorized) or 0x86; 3.1.1: 5 (not authorized) or 4."""
    client = mqtt.raw_unconnected(version, broker=secured)
    connack = client.connect(expect_code=None)
    assert connack.code in ((0x87, 0x86) if version == V5 else (5, 4))
    client.wait_closed()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_sub_with_a_wrong_password_fails(secured, version):
    result = subprocess.run(
        [fx.MOSQUITTO_SUB, *fx.mosquitto_args(secured, version), "-u", "bob", "-P", "nope",
         "-t", "sensors/#", "-C", "1", "-W", "5"],
        capture_output=True, timeout=fx.TIMEOUT)
    assert result.returncode != 0
    assert result.stdout == b""


# ---- authorisation --------------------------------------------------------------------------

NO_SUBSCRIBE_ACL = ("refusing a subscription by ACL: Mosquitto's acl_file has no subscribe "
                    "permission; it grants every subscription and filters on delivery")


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_refused_subscriptions_get_their_reason_code(mqtt, secured, version):
    """Per filter in one SUBSCRIBE: allowed ones granted; refused with 0x87 Not authorized in
    5.0, 0x80 Failure in 3.1.1: a denied filter, a filter no rule matches, and a wildcard
    filter that could match a denied topic (`sensors/#` reaches sensors/private/...)."""
    fx.silt_only(NO_SUBSCRIBE_ACL)
    bob = login(mqtt, secured, "bob", version)
    codes = bob.subscribe([("sensors/temp", 1), ("sensors/private/key", 1), ("secret/x", 1),
                           ("sensors/temp/+", 0), ("sensors/#", 1)])
    refused = 0x87 if version == V5 else 0x80
    assert codes == [1, refused, refused, 0, refused]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_sees_refused_subscriptions(mqtt, secured, version):
    fx.silt_only(NO_SUBSCRIBE_ACL)
    bob = mqtt.paho(version, broker=secured, username="bob", password=USERS["bob"])
    assert bob.subscribe("secret/#", qos=1) == [0x87 if version == V5 else 0x80]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_denied_topics_are_not_delivered(mqtt, secured, version):
    """Whether the broker refuses the subscription (silt) or grants it and filters (Mosquitto),
    nothing on a denied topic reaches the subscriber."""
    bob = login(mqtt, secured, "bob", version)
    bob.subscribe([("sensors/private/key", 1), ("secret/x", 1), ("sensors/public", 1)])
    admin = login(mqtt, secured, "admin", version)
    admin.publish("sensors/private/key", b"hidden", qos=1)
    admin.publish("secret/x", b"hidden", qos=1)
    admin.publish("sensors/public", b"visible", qos=1)
    message = bob.expect_publish()
    assert (message.topic, message.payload) == ("sensors/public", b"visible")
    admin.publish("sensors/public", b"barrier", qos=1)
    assert bob.expect_publish().payload == b"barrier"


def test_v5_refused_publish_gets_puback_0x87_and_goes_nowhere(mqtt, secured):
    admin = login(mqtt, secured, "admin")
    admin.subscribe([("#", 1)])
    alice = login(mqtt, secured, "alice")
    assert alice.publish("elsewhere/x", b"denied", qos=1) == 0x87
    assert alice.publish("sensors/x", b"allowed", qos=1) == 0
    message = admin.expect_publish()
    assert (message.topic, message.payload) == ("sensors/x", b"allowed")


def test_v311_refused_publish_goes_nowhere(mqtt, secured):
    """3.1.1 has no reason code: the broker acknowledges (or closes), and drops it."""
    admin = login(mqtt, secured, "admin")
    admin.subscribe([("#", 1)])
    alice = login(mqtt, secured, "alice", V311)
    alice.publish("elsewhere/x", b"denied", qos=1)
    alice.publish("sensors/x", b"allowed", qos=1)
    message = admin.expect_publish()
    assert (message.topic, message.payload) == ("sensors/x", b"allowed")


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_user_name_pattern(mqtt, secured, version):
    """`users/%u/#`: each user owns the subtree under its own name, and only that one."""
    alice = login(mqtt, secured, "alice", version)
    alice.subscribe([("users/alice/inbox", 1), ("users/bob/inbox", 1)])
    bob = login(mqtt, secured, "bob", version)
    bob.subscribe([("users/bob/inbox", 1), ("users/alice/inbox", 1)])
    alice.publish("users/alice/inbox", b"note to self", qos=1)
    # Neither may publish into the other's tree, nor receive from it.
    alice.publish("users/bob/inbox", b"intrusion", qos=1)
    bob.publish("users/alice/inbox", b"intrusion", qos=1)
    bob.publish("users/bob/inbox", b"own", qos=1)
    assert (alice.expect_publish().payload, bob.expect_publish().payload) == \
        (b"note to self", b"own")
    alice.publish("users/alice/inbox", b"barrier", qos=1)
    bob.publish("users/bob/inbox", b"barrier", qos=1)
    assert (alice.expect_publish().payload, bob.expect_publish().payload) == \
        (b"barrier", b"barrier")


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_user_name_pattern_refuses_other_users_subtrees(mqtt, secured, version):
    fx.silt_only(NO_SUBSCRIBE_ACL)
    alice = login(mqtt, secured, "alice", version)
    refused = 0x87 if version == V5 else 0x80
    assert alice.subscribe([("users/alice/inbox", 1), ("users/bob/inbox", 1)]) == [1, refused]
