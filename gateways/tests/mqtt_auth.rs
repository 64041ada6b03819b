//! The broker's password file and ACL: hashes made by the real `mosquitto_passwd` (Debian
//! package `mosquitto`), lines of ours read by a real mosquitto broker, errors that name the
//! line, and the ACL's publish, subscribe and receive decisions, with a property test of
//! filter coverage and overlap against brute-force matching.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use silt_gateways::mqtt::auth::{
    AclFault, AclRules, AuthError, Identity, PasswordFault, PasswordFile, hash_password_line,
};
use silt_gateways::mqtt::{TopicFilter, TopicName};

// ---------------------------------------------------------------------------------------------
// Password files

/// Runs `mosquitto_passwd` with `args`, failing the test with its output if it fails.
fn mosquitto_passwd(args: &[&str]) {
    let output = Command::new("mosquitto_passwd")
        .args(args)
        .output()
        .expect("mosquitto_passwd runs (Debian package `mosquitto`)");
    assert_output_ok("mosquitto_passwd", &output);
}

fn assert_output_ok(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

const USERS: [(&str, &str); 5] = [
    ("alice", "correct horse"),
    ("bob", "p@ss:w0rd$7$"),
    ("carol", "pässwörd ✓"),
    ("sensor-7", "x"),
    ("dave", ""),
];

/// A password file made by `mosquitto_passwd` with hash type `hash` for [`USERS`].
fn mosquitto_file(dir: &Path, hash: &str) -> PathBuf {
    let path = dir.join(format!("passwd-{hash}"));
    for (index, (user, password)) in USERS.iter().enumerate() {
        let mut args = vec!["-H", hash];
        if index == 0 {
            args.push("-c");
        }
        args.extend(["-b", path_str(&path), user, password]);
        mosquitto_passwd(&args);
    }
    path
}

fn assert_verifies_users(file: &PasswordFile) {
    assert_eq!(file.len(), USERS.len());
    for (user, password) in USERS {
        assert!(
            file.verify(user, password.as_bytes()),
            "{user} with the right password"
        );
        assert!(!file.verify(user, b"wrong"), "{user} with a wrong password");
        let mut longer = password.as_bytes().to_vec();
        longer.push(b'!');
        assert!(!file.verify(user, &longer), "{user} with one extra byte");
    }
    // Another user's password, an unknown user, a user name of the wrong case.
    assert!(!file.verify("alice", b"x"));
    assert!(!file.verify("mallory", b"correct horse"));
    assert!(!file.verify("Alice", b"correct horse"));
}

#[test]
fn pbkdf2_hashes_from_mosquitto_passwd_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = mosquitto_file(dir.path(), "sha512-pbkdf2");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().all(|line| line.contains(":$7$")), "{text}");
    assert_verifies_users(&PasswordFile::load(&path).unwrap());
}

#[test]
fn sha512_hashes_from_older_mosquitto_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = mosquitto_file(dir.path(), "sha512");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().all(|line| line.contains(":$6$")), "{text}");
    assert_verifies_users(&PasswordFile::load(&path).unwrap());
}

#[test]
fn comments_blank_lines_and_crlf_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let made = std::fs::read_to_string(mosquitto_file(dir.path(), "sha512-pbkdf2")).unwrap();
    let mut text = String::from("# users of the plant\r\n\r\n   \n");
    for line in made.lines() {
        text.push_str("  ");
        text.push_str(line);
        text.push_str(" \r\n");
        text.push_str("  # a comment after each user\n");
    }
    assert_verifies_users(&PasswordFile::parse(&text).unwrap());
}

#[test]
fn our_lines_verify_and_mix_with_mosquittos() {
    let line = hash_password_line("edge-admin", "s3cret pass").unwrap();
    assert!(line.starts_with("edge-admin:$7$2000$"), "{line}");
    assert!(!line.contains('\n'));
    let dir = tempfile::tempdir().unwrap();
    let made = std::fs::read_to_string(mosquitto_file(dir.path(), "sha512")).unwrap();
    let file = PasswordFile::parse(&format!("{made}{line}\n")).unwrap();
    assert!(file.verify("edge-admin", b"s3cret pass"));
    assert!(!file.verify("edge-admin", b"s3cret pass "));
    assert!(file.verify("alice", b"correct horse"));
    // A fresh salt each time.
    assert_ne!(
        line,
        hash_password_line("edge-admin", "s3cret pass").unwrap()
    );
}

#[test]
fn user_names_the_format_cannot_hold_are_refused() {
    for bad in [
        "",
        "a:b",
        "#admin",
        " padded",
        "padded ",
        "line\nbreak",
        "tab\t",
    ] {
        assert!(
            matches!(
                hash_password_line(bad, "x"),
                Err(AuthError::InvalidUsername)
            ),
            "{bad:?}"
        );
    }
}

/// Kills and reaps the broker when a test ends, however it ends.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port, chosen by the kernel.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

fn mosquitto_pub(port: u16, user: &str, password: &str) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(["-u", user, "-P", password, "-t", "t", "-m", "x", "-q", "1"])
        .output()
        .expect("mosquitto_pub runs (Debian package `mosquitto-clients`)")
}

#[test]
fn a_mosquitto_broker_accepts_our_lines() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let line = hash_password_line("edge-admin", "s3cret pass").unwrap();
    std::fs::write(&passwd, format!("{line}\n")).unwrap();
    let port = free_port();
    let config = dir.path().join("mosquitto.conf");
    // `user root` keeps a broker started as root (as in CI) able to read the temp dir.
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             persistence false\nuser root\n",
            passwd.display()
        ),
    )
    .unwrap();
    let _broker = Broker(
        Command::new("mosquitto")
            .args(["-c", path_str(&config)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs (Debian package `mosquitto`)"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_output_ok(
        "mosquitto_pub with our hash",
        &mosquitto_pub(port, "edge-admin", "s3cret pass"),
    );
    let refused = mosquitto_pub(port, "edge-admin", "wrong");
    assert!(!refused.status.success(), "a wrong password was accepted");
}

/// The error for `text`, which must name `line` and not contain `secret`.
fn password_error(text: &str) -> (usize, PasswordFault, String) {
    match PasswordFile::parse(text) {
        Err(AuthError::Password { line, fault, path }) => {
            assert_eq!(path, None);
            let message = AuthError::Password {
                path: None,
                line,
                fault: fault.clone(),
            }
            .to_string();
            (line, fault, message)
        }
        other => panic!("{text:?} gave {other:?}"),
    }
}

const GOOD: &str = "ok:$7$101$dKQVGPKh46jC6gG5$97f/R/LTf/kRtFWhaJWlNKUqviAVYKASxyvWpTQtxG1cvZlU6mlkrqtmNv7dp6xrZejdETaic+I3UCH1UCmSLw==";
const SALT: &str = "dKQVGPKh46jC6gG5";
const HASH: &str =
    "97f/R/LTf/kRtFWhaJWlNKUqviAVYKASxyvWpTQtxG1cvZlU6mlkrqtmNv7dp6xrZejdETaic+I3UCH1UCmSLw==";

#[test]
fn the_known_mosquitto_line_verifies() {
    // Made by `mosquitto_passwd -b FILE alice secret`, mosquitto 2.0.11.
    let file = PasswordFile::parse(&GOOD.replacen("ok", "alice", 1)).unwrap();
    assert!(file.verify("alice", b"secret"));
    assert!(!file.verify("alice", b"Secret"));
}

#[test]
fn malformed_password_lines_are_named_by_number() {
    let cases: Vec<(String, PasswordFault)> = vec![
        ("no colon here".into(), PasswordFault::MissingColon),
        (
            format!(":$7$101${SALT}${HASH}"),
            PasswordFault::EmptyUsername,
        ),
        ("eve:plain-text".into(), PasswordFault::NotHashed),
        (
            format!("eve:$argon2id$v=19${SALT}${HASH}"),
            PasswordFault::UnsupportedScheme {
                scheme: "argon2id".into(),
            },
        ),
        (
            format!("eve:$7${SALT}${HASH}"),
            PasswordFault::WrongFieldCount { expected: 3 },
        ),
        (
            format!("eve:$6$101${SALT}${HASH}"),
            PasswordFault::WrongFieldCount { expected: 2 },
        ),
        (
            format!("eve:$7$0${SALT}${HASH}"),
            PasswordFault::BadIterations,
        ),
        (
            format!("eve:$7$-5${SALT}${HASH}"),
            PasswordFault::BadIterations,
        ),
        (
            format!("eve:$7$99999999${SALT}${HASH}"),
            PasswordFault::BadIterations,
        ),
        (
            format!("eve:$7$101$c2FsdA==${HASH}"),
            PasswordFault::BadSalt,
        ),
        (
            format!("eve:$7$101$not*base64${HASH}"),
            PasswordFault::BadSalt,
        ),
        (
            format!("eve:$7$101${SALT}$c2hvcnQ="),
            PasswordFault::BadHash,
        ),
        (
            format!("eve:$7$101${SALT}${}", &HASH[..80]),
            PasswordFault::BadHash,
        ),
    ];
    for (bad, expected) in cases {
        let text = format!("# header\n{GOOD}\n\n{bad}\n");
        let (line, fault, message) = password_error(&text);
        assert_eq!((line, &fault), (4, &expected), "{bad}");
        assert!(message.starts_with("line 4: "), "{message}");
        assert!(
            !message.contains(SALT) && !message.contains(&HASH[..20]),
            "{message}"
        );
    }
}

#[test]
fn a_user_defined_twice_is_an_error() {
    let text = format!("{GOOD}\n#\n{GOOD}\n");
    let (line, fault, _) = password_error(&text);
    assert_eq!(line, 3);
    assert_eq!(
        fault,
        PasswordFault::DuplicateUser {
            username: "ok".into(),
            first_line: 1
        }
    );
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let error = PasswordFile::load(&missing).unwrap_err();
    assert!(matches!(error, AuthError::Read { .. }));
    assert!(error.to_string().contains(path_str(&missing)), "{error}");

    let bad = dir.path().join("passwd");
    std::fs::write(&bad, format!("{GOOD}\nbroken\n")).unwrap();
    let error = PasswordFile::load(&bad).unwrap_err();
    assert_eq!(error.line(), Some(2));
    assert_eq!(
        error.to_string(),
        format!(
            "{}: line 2: expected `user:hash`, but the line has no ':'",
            bad.display()
        )
    );

    std::fs::write(&bad, b"ok:\xff\xfe\n").unwrap();
    let error = PasswordFile::load(&bad).unwrap_err();
    assert!(matches!(
        error,
        AuthError::Password {
            line: 1,
            fault: PasswordFault::NotUtf8,
            ..
        }
    ));

    std::fs::write(&bad, format!("{GOOD}\n{}\n", "a".repeat(70_000))).unwrap();
    let error = PasswordFile::load(&bad).unwrap_err();
    assert!(matches!(
        error,
        AuthError::Password {
            line: 2,
            fault: PasswordFault::LineTooLong { bytes: 70_000 },
            ..
        }
    ));

    // Sparse: the limit is checked without the test writing 16 MiB.
    let huge = std::fs::File::create(&bad).unwrap();
    huge.set_len(16 * 1024 * 1024 + 1).unwrap();
    let error = PasswordFile::load(&bad).unwrap_err();
    assert!(matches!(error, AuthError::TooLarge { .. }), "{error}");
    let error = AclRules::load(&bad).unwrap_err();
    assert!(matches!(error, AuthError::TooLarge { .. }), "{error}");
}

#[test]
fn an_empty_password_file_lets_nobody_in() {
    let file = PasswordFile::parse("# nobody yet\n").unwrap();
    assert!(file.is_empty());
    assert!(!file.verify("alice", b""));
    assert_eq!(format!("{file:?}"), "PasswordFile { users: 0, .. }");
}

// ---------------------------------------------------------------------------------------------
// ACL

fn acl(text: &str) -> AclRules {
    AclRules::parse(text).unwrap()
}

fn name(raw: &str) -> TopicName {
    TopicName::new(raw).unwrap()
}

fn filter(raw: &str) -> TopicFilter {
    TopicFilter::new(raw).unwrap()
}

fn user<'a>(username: &'a str, client_id: &'a str) -> Identity<'a> {
    Identity {
        client_id,
        username: Some(username),
    }
}

fn anonymous(client_id: &str) -> Identity<'_> {
    Identity {
        client_id,
        username: None,
    }
}

#[test]
fn first_matching_rule_wins_and_no_match_denies() {
    let rules = acl("
        # secrets first, so the broad allow below does not reach them
        deny    publish    any            plant/+/secret
        allow   publish    any            plant/#
        allow   publish    user:admin     plant/line1/secret
        allow   subscribe  any            plant/#
    ");
    let admin = user("admin", "c1");
    assert!(rules.allows_publish(&admin, &name("plant/line1/temp")));
    assert!(rules.allows_publish(&admin, &name("plant")));
    // The deny comes first, so the admin's own allow is never reached.
    assert!(!rules.allows_publish(&admin, &name("plant/line1/secret")));
    // Nothing matches: denied.
    assert!(!rules.allows_publish(&admin, &name("office/temp")));
    // `subscribe` rules do not grant publishing, nor `publish` rules subscribing.
    let only_subscribe = acl("allow subscribe any #");
    assert!(!only_subscribe.allows_publish(&admin, &name("a")));
    let only_publish = acl("allow publish any #");
    assert!(!only_publish.allows_subscribe(&admin, &filter("a")));
    assert!(!only_publish.allows_receive(&admin, &name("a")));
}

#[test]
fn rules_name_users_clients_or_anyone() {
    let rules = acl("
        allow all  user:alice    alice/#
        allow all  client:dev-1  devices/1/#
        allow all  any           public/#
    ");
    let alice = user("alice", "phone");
    let device = anonymous("dev-1");
    let stranger = anonymous("x");
    assert!(rules.allows_publish(&alice, &name("alice/notes")));
    assert!(!rules.allows_publish(&device, &name("alice/notes")));
    assert!(rules.allows_publish(&device, &name("devices/1/temp")));
    assert!(!rules.allows_publish(&alice, &name("devices/1/temp")));
    // A user name is not a client id, nor the reverse.
    assert!(!rules.allows_publish(&user("dev-1", "y"), &name("devices/1/temp")));
    assert!(!rules.allows_publish(&anonymous("alice"), &name("alice/notes")));
    for who in [alice, device, stranger] {
        assert!(rules.allows_publish(&who, &name("public/news")));
        assert!(rules.allows_subscribe(&who, &filter("public/+")));
        assert!(!rules.allows_publish(&who, &name("private")));
    }
}

#[test]
fn substitutions_give_each_user_and_client_their_own_tree() {
    let rules = acl("
        allow all  any  users/%u/#
        allow all  any  clients/%c/#
        allow all  any  tagged/u-%u-c-%c
        allow all  any  literal/100%%
    ");
    let bob = user("bob", "bob-phone");
    assert!(rules.allows_publish(&bob, &name("users/bob/x")));
    assert!(rules.allows_publish(&bob, &name("users/bob")));
    assert!(!rules.allows_publish(&bob, &name("users/alice/x")));
    assert!(!rules.allows_publish(&bob, &name("users/bobby/x")));
    assert!(rules.allows_publish(&bob, &name("clients/bob-phone/y")));
    assert!(!rules.allows_publish(&bob, &name("clients/bob/y")));
    assert!(rules.allows_publish(&bob, &name("tagged/u-bob-c-bob-phone")));
    assert!(!rules.allows_publish(&bob, &name("tagged/u-bob-c-bob")));
    assert!(rules.allows_publish(&bob, &name("literal/100%")));
    assert!(rules.allows_subscribe(&bob, &filter("users/bob/+/temp")));
    assert!(!rules.allows_subscribe(&bob, &filter("users/+/temp")));
    assert!(rules.allows_receive(&bob, &name("users/bob/a")));
    assert!(!rules.allows_receive(&bob, &name("users/eve/a")));
}

#[test]
fn unusable_substitutions_never_widen_access() {
    let rules = acl("allow all any users/%u/#\nallow all any %c/#");
    // No user name: the %u rule does not apply at all.
    let nobody = anonymous("c");
    assert!(!rules.allows_publish(&nobody, &name("users//x")));
    assert!(!rules.allows_subscribe(&nobody, &filter("users/+/#")));
    // User names that would read as wildcards or extra levels.
    for (bad, topic) in [
        ("#", "users/anyone/x"),
        ("+", "users/anyone/x"),
        ("a/b", "users/a/b/x"),
        ("", "users//x"),
    ] {
        let who = user(bad, "c");
        assert!(!rules.allows_publish(&who, &name(topic)), "user {bad:?}");
        assert!(
            !rules.allows_subscribe(&who, &filter("users/#")),
            "user {bad:?}"
        );
    }
    // A client id starting with `$` must not open `$SYS` through `%c/#`.
    let sneaky = anonymous("$SYS");
    assert!(!rules.allows_subscribe(&sneaky, &filter("$SYS/#")));
    assert!(!rules.allows_receive(&sneaky, &name("$SYS/broker/uptime")));
    assert!(rules.allows_publish(&anonymous("dev"), &name("dev/x")));

    // A deny whose substitution fails denies as if for every possible value.
    let rules = acl("deny publish any secret/%u/#\nallow publish any #");
    assert!(!rules.allows_publish(&nobody, &name("secret/anyone/x")));
    assert!(!rules.allows_publish(&user("a/b", "c"), &name("secret/z/x")));
    assert!(rules.allows_publish(&user("bob", "c"), &name("secret/alice/x")));
    assert!(!rules.allows_publish(&user("bob", "c"), &name("secret/bob/x")));
    assert!(rules.allows_publish(&nobody, &name("open/x")));
    // Even where the value would begin the topic, and so for `$` topics too.
    let rules =
        acl("deny subscribe any %u/private/#\nallow subscribe any #\nallow subscribe any $SYS/#");
    assert!(!rules.allows_subscribe(&nobody, &filter("$SYS/private/x")));
    assert!(!rules.allows_receive(&nobody, &name("anyone/private/x")));
    assert!(rules.allows_subscribe(&nobody, &filter("$SYS/public/x")));
    assert!(rules.allows_subscribe(&user("bob", "c"), &filter("alice/private/x")));
    assert!(!rules.allows_subscribe(&user("bob", "c"), &filter("bob/private/x")));
}

#[test]
fn subscribe_needs_an_allow_that_covers_the_whole_filter() {
    let rules = acl("allow subscribe any sensors/#\nallow subscribe any rooms/+/temp");
    let who = anonymous("c");
    for granted in [
        "sensors/#",
        "sensors",
        "sensors/+",
        "sensors/a/+/b",
        "rooms/+/temp",
        "rooms/kitchen/temp",
    ] {
        assert!(rules.allows_subscribe(&who, &filter(granted)), "{granted}");
    }
    for refused in [
        "#",
        "+/#",
        "+",
        "sens/#",
        "rooms/#",
        "rooms/+/+",
        "rooms/+/temp/#",
        "rooms/kitchen",
        "+/kitchen/temp",
    ] {
        assert!(!rules.allows_subscribe(&who, &filter(refused)), "{refused}");
    }
}

#[test]
fn a_deny_refuses_every_filter_that_overlaps_it() {
    let rules = acl("deny subscribe any plant/+/secret\nallow subscribe any #");
    let who = anonymous("c");
    for refused in [
        "#",
        "plant/#",
        "plant/+/secret",
        "plant/line1/secret",
        "+/+/secret",
        "+/line1/+",
        "plant/+/+/#",
    ] {
        assert!(!rules.allows_subscribe(&who, &filter(refused)), "{refused}");
    }
    for granted in [
        "plant/+/public",
        "plant/line1",
        "plant/+/secret/more",
        "plant/a/b/c",
        "+/+",
    ] {
        assert!(rules.allows_subscribe(&who, &filter(granted)), "{granted}");
    }
}

#[test]
fn receive_is_checked_per_topic() {
    // An allow before the deny grants `#`; under the same rules a message is then
    // delivered, since the allow matches first there too.
    let rules = acl("
        allow subscribe user:ops     #
        deny  subscribe any          plant/+/secret
        allow subscribe any          plant/#
    ");
    let ops = user("ops", "c1");
    let viewer = user("viewer", "c2");
    assert!(rules.allows_subscribe(&ops, &filter("#")));
    assert!(rules.allows_receive(&ops, &name("plant/l1/secret")));
    assert!(!rules.allows_subscribe(&viewer, &filter("plant/#")));
    assert!(rules.allows_subscribe(&viewer, &filter("plant/l1/temp/#")));
    // `+` then `#` can match `plant/l1/secret` (`#` matches its parent level too).
    assert!(!rules.allows_subscribe(&viewer, &filter("plant/l1/+/#")));
    assert!(rules.allows_receive(&viewer, &name("plant/l1/temp")));
    assert!(!rules.allows_receive(&viewer, &name("plant/l1/secret")));
    assert!(!rules.allows_receive(&viewer, &name("office/temp")));

    // After a reload that adds a deny, an old `#` subscription stops leaking.
    let reloaded = acl("deny subscribe any plant/+/secret\nallow subscribe any #");
    assert!(!reloaded.allows_receive(&ops, &name("plant/l1/secret")));
    assert!(reloaded.allows_receive(&ops, &name("plant/l1/temp")));
}

#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let everything = acl("allow all any #");
    let who = anonymous("c");
    assert!(everything.allows_publish(&who, &name("a/b")));
    assert!(!everything.allows_publish(&who, &name("$SYS/x")));
    assert!(!everything.allows_subscribe(&who, &filter("$SYS/#")));
    assert!(!everything.allows_receive(&who, &name("$SYS/broker/load")));
    let plus = acl("allow all any +/#");
    assert!(!plus.allows_subscribe(&who, &filter("$SYS/+")));

    let monitoring = acl("allow subscribe user:mon $SYS/#\nallow subscribe any #");
    let mon = user("mon", "m");
    assert!(monitoring.allows_subscribe(&mon, &filter("$SYS/#")));
    assert!(monitoring.allows_subscribe(&mon, &filter("$SYS/broker/+")));
    assert!(monitoring.allows_receive(&mon, &name("$SYS/broker/load")));
    assert!(!monitoring.allows_subscribe(&who, &filter("$SYS/#")));

    // A deny on `#` does not reach `$SYS`, which its filter never matches, and a deny on
    // `$SYS/#` does not refuse `#`, which never receives `$SYS` topics.
    let rules = acl("deny subscribe any $SYS/#\nallow subscribe any #\nallow subscribe any $SYS/#");
    assert!(rules.allows_subscribe(&who, &filter("#")));
    assert!(!rules.allows_subscribe(&who, &filter("$SYS/broker")));
    let rules = acl("deny subscribe any #\nallow subscribe any $SYS/#");
    assert!(rules.allows_subscribe(&who, &filter("$SYS/#")));
    assert!(!rules.allows_subscribe(&who, &filter("a")));
}

fn acl_error(text: &str) -> (usize, AclFault) {
    match AclRules::parse(text) {
        Err(AuthError::Acl { line, fault, .. }) => (line, fault),
        other => panic!("{text:?} gave {other:?}"),
    }
}

#[test]
fn malformed_acl_lines_are_named_by_number() {
    let cases = [
        ("allow publish any", AclFault::Incomplete),
        ("allow", AclFault::Incomplete),
        (
            "permit publish any a",
            AclFault::UnknownEffect("permit".into()),
        ),
        ("allow read any a", AclFault::UnknownAction("read".into())),
        (
            "allow all everyone a",
            AclFault::UnknownSubject("everyone".into()),
        ),
        (
            "allow all user: a",
            AclFault::UnknownSubject("user:".into()),
        ),
        ("allow all any a/%x", AclFault::UnknownSubstitution('x')),
        ("allow all any a/%", AclFault::TrailingPercent),
    ];
    for (bad, expected) in cases {
        let text = format!("# rules\nallow all any ok\n{bad}\n");
        assert_eq!(acl_error(&text), (3, expected), "{bad}");
    }
    for bad in ["a/#/b", "a+", "a/%u#", "a/b#"] {
        let (line, fault) = acl_error(&format!("\n\nallow all any {bad}"));
        assert_eq!(line, 3, "{bad}");
        assert!(
            matches!(fault, AclFault::InvalidFilter(_)),
            "{bad}: {fault:?}"
        );
    }
    let error = AclRules::parse("# nothing\n\n").unwrap_err();
    assert!(
        matches!(error, AuthError::NoRules { path: None }),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acl");
    std::fs::write(&path, "allow all any a\ndeny nothing\n").unwrap();
    let error = AclRules::load(&path).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}: line 2: ", path.display())),
        "{error}"
    );
    std::fs::write(&path, "allow   all   any   a b/c  \n").unwrap();
    let rules = AclRules::load(&path).unwrap();
    assert_eq!(rules.len(), 1);
    // The filter is the rest of the line, inner blanks included.
    assert!(rules.allows_publish(&anonymous("c"), &name("a b/c")));
}

// ---------------------------------------------------------------------------------------------
// Coverage and overlap against brute force over a small universe: every pair of small
// filters, and random rule lists.

/// Literal levels filters are made of; `$s` tests the `$` rule at the first level and its
/// absence further down.
const FILTER_LITERALS: [&str; 3] = ["a", "$s", ""];
/// Topic levels: the filter literals plus one value no filter names.
const TOPIC_LEVELS: [&str; 4] = ["a", "$s", "", "b"];
/// Filters have at most this many levels; topics one more, so that `#` against a fixed
/// depth has a witness.
const FILTER_LEVELS_MAX: usize = 3;

/// Every valid topic name of up to `FILTER_LEVELS_MAX + 1` levels over [`TOPIC_LEVELS`].
fn universe() -> &'static [TopicName] {
    static UNIVERSE: LazyLock<Vec<TopicName>> = LazyLock::new(build_universe);
    &UNIVERSE
}

fn build_universe() -> Vec<TopicName> {
    let mut names = Vec::new();
    let mut current: Vec<Vec<&str>> = vec![vec![]];
    for _ in 0..=FILTER_LEVELS_MAX {
        let mut next = Vec::new();
        for prefix in &current {
            for level in TOPIC_LEVELS {
                let mut levels = prefix.clone();
                levels.push(level);
                if let Ok(topic) = TopicName::new(&levels.join("/")) {
                    names.push(topic);
                }
                next.push(levels);
            }
        }
        current = next;
    }
    names
}

fn filter_strategy() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        prop::sample::select(FILTER_LITERALS.to_vec()).prop_map(str::to_owned),
        Just("+".to_owned()),
    ];
    (
        prop::collection::vec(level, 1..=FILTER_LEVELS_MAX),
        any::<bool>(),
    )
        .prop_map(|(mut levels, hash)| {
            if hash {
                let last = levels.len() - 1;
                levels[last] = "#".to_owned();
            }
            levels.join("/")
        })
        // A single empty level is the empty string, which no filter may be.
        .prop_filter("a valid filter", |raw| TopicFilter::new(raw).is_ok())
}

/// Every valid filter of up to [`FILTER_LEVELS_MAX`] levels over [`FILTER_LITERALS`], `+`
/// and a final `#`: few enough (under 200) to check every pair.
fn all_filters() -> Vec<TopicFilter> {
    let choices: Vec<&str> = FILTER_LITERALS.iter().copied().chain(["+"]).collect();
    let mut filters = Vec::new();
    let mut current: Vec<Vec<&str>> = vec![vec![]];
    for _ in 0..FILTER_LEVELS_MAX {
        let mut next = Vec::new();
        for prefix in &current {
            for level in choices.iter().copied().chain(["#"]) {
                let mut levels = prefix.clone();
                levels.push(level);
                if let Ok(filter) = TopicFilter::new(&levels.join("/")) {
                    filters.push(filter);
                }
                if level != "#" {
                    next.push(levels);
                }
            }
        }
        current = next;
    }
    filters
}

#[test]
fn allow_covers_exactly_when_every_topic_matches() {
    let filters = all_filters();
    let who = anonymous("c");
    for rule in &filters {
        let rules = acl(&format!("allow subscribe any {rule}"));
        for sub in &filters {
            let covered = universe()
                .iter()
                .all(|topic| !sub.matches(topic) || rule.matches(topic));
            assert_eq!(
                rules.allows_subscribe(&who, sub),
                covered,
                "allow {rule}, subscribe {sub}"
            );
        }
    }
}

#[test]
fn deny_applies_exactly_when_some_topic_matches_both() {
    let filters = all_filters();
    let who = anonymous("c");
    for rule in &filters {
        // The allows after the deny grant every filter there is here.
        let rules = acl(&format!(
            "deny subscribe any {rule}\nallow subscribe any #\nallow subscribe any $s/#"
        ));
        for sub in &filters {
            let overlap = universe()
                .iter()
                .any(|topic| sub.matches(topic) && rule.matches(topic));
            assert_eq!(
                rules.allows_subscribe(&who, sub),
                !overlap,
                "deny {rule}, subscribe {sub}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn granted_subscriptions_receive_every_matching_topic(
        rules in prop::collection::vec((any::<bool>(), filter_strategy()), 1..5),
        sub in filter_strategy(),
    ) {
        let text: String = rules
            .iter()
            .map(|(allow, rule)| format!("{} subscribe any {rule}\n", if *allow { "allow" } else { "deny" }))
            .collect();
        let acl = acl(&text);
        let who = anonymous("c");
        let sub_filter = filter(&sub);
        if acl.allows_subscribe(&who, &sub_filter) {
            for topic in universe().iter().filter(|topic| sub_filter.matches(topic)) {
                prop_assert!(acl.allows_receive(&who, topic), "{} under {}", topic, text);
            }
        }
    }

    #[test]
    fn parsers_never_panic(text in "[a-z$#%+/:\\n \\t0-9A-Za-z=]{0,200}") {
        let _ = PasswordFile::parse(&text);
        let _ = AclRules::parse(&text);
    }
}
