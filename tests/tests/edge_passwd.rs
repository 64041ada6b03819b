//! `silt-edge passwd` writes a password file the broker accepts: a real client (mosquitto_pub)
//! gets in with the right password and is refused with a wrong one, or without one.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use silt_tests::{Running, START_TIMEOUT, edge_mqtt_addr, silt_edge};

fn passwd(file: &Path, user: &str, password: &str, extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(silt_edge())
        .arg("passwd")
        .arg(file)
        .arg(user)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command may refuse (a broken file, `-D`) and exit before reading stdin; the write then
    // meets a closed pipe, which is not this helper's concern: the exit status says what happened.
    let written = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes());
    if let Err(error) = written {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    child.wait_with_output().unwrap()
}

/// Publishes one QoS 1 message with mosquitto_pub; true if the broker took it.
fn publish(addr: std::net::SocketAddr, user: Option<(&str, &str)>) -> bool {
    let mut command = Command::new("mosquitto_pub");
    command.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
    command.args(["-t", "auth/test", "-m", "hello", "-q", "1", "-V", "mqttv5"]);
    if let Some((user, password)) = user {
        command.args(["-u", user, "-P", password]);
    }
    let output = command
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
    output.status.success()
}

#[test]
fn passwd_users_can_connect_and_others_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqtt.passwd");
    assert!(
        passwd(&file, "sensor1", "right horse", &[])
            .status
            .success()
    );
    assert!(
        passwd(&file, "sensor2", "battery staple", &[])
            .status
            .success()
    );
    // Changing a password replaces the line.
    assert!(passwd(&file, "sensor2", "correct", &[]).status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|line| line.contains(":$7$")), "{text}");
    // A broken file is refused, not overwritten.
    let broken = dir.path().join("broken.passwd");
    std::fs::write(&broken, "not a password line\n").unwrap();
    let output = passwd(&broken, "x", "y", &[]);
    assert!(!output.status.success());
    assert_eq!(
        std::fs::read_to_string(&broken).unwrap(),
        "not a password line\n"
    );

    let mut edge = Running::start({
        let mut command = Command::new(silt_edge());
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--set", &format!("mqtt.password_file={}", file.display())]);
        command
    });
    let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
    let addr = edge_mqtt_addr(&started);

    assert!(publish(addr, Some(("sensor1", "right horse"))));
    assert!(publish(addr, Some(("sensor2", "correct"))));
    assert!(
        !publish(addr, Some(("sensor2", "battery staple"))),
        "old password"
    );
    assert!(!publish(addr, Some(("sensor1", "wrong"))));
    assert!(!publish(addr, Some(("nobody", "right horse"))));
    assert!(!publish(addr, None), "anonymous access is off by default");
    edge.stop_cleanly();

    // Deleting a user.
    assert!(passwd(&file, "sensor1", "", &["-D"]).status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("sensor1:"), "{text}");
    assert!(!passwd(&file, "sensor1", "", &["-D"]).status.success());
}
