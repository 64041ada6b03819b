//! A fingerprint of the device the edge runs on, kept in its log's `meta.json`
//! ([`silt_log::LogManager::host`]), so that a data directory that reaches another device
//! (an SD card image flashed to a fleet after the edge had run on it, a disk moved to a new
//! board) is told from the original: its log id is renewed there (`open_cursors`), or the
//! copies would ship the same edge log's offsets with different records, and the core would
//! take all but the first for duplicates.
//!
//! What identifies a device: the board's serial number where the firmware has one (every
//! Raspberry Pi), the permanent MAC addresses of its physical network interfaces, and
//! `/etc/machine-id`. The machine id alone is not enough, as a card imaged after its first
//! boot carries the same one to every copy. A change of any of them (a new network card)
//! renews the id too, which costs nothing but a new id: the cursors move with it.

use std::path::Path;

/// MAC of an interface with no hardware address.
const NO_ADDRESS: &str = "00:00:00:00:00:00";
/// `addr_assign_type` of an address burnt into the device (not random, not set by hand).
const ADDRESS_PERMANENT: &str = "0";
/// Hex digits of a fingerprint: 128 bits of SHA-256.
const DIGITS: usize = 32;

/// This device's fingerprint, or `None` when nothing identifies it (a container without
/// a machine id or a physical interface).
pub(crate) fn fingerprint() -> Option<String> {
    fingerprint_under(Path::new("/"))
}

/// The fingerprint as read from the files under `root` (`/`, or a test's tree).
pub(crate) fn fingerprint_under(root: &Path) -> Option<String> {
    let read = |path: &Path| {
        std::fs::read(root.join(path)).ok().map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string()
        })
    };
    let mut parts = Vec::new();
    if let Some(id) = read(Path::new("etc/machine-id")).filter(|id| !id.is_empty()) {
        parts.push(format!("machine-id={id}"));
    }
    if let Some(serial) =
        read(Path::new("sys/firmware/devicetree/base/serial-number")).filter(|s| !s.is_empty())
    {
        parts.push(format!("serial={serial}"));
    }
    let net = root.join("sys/class/net");
    if let Ok(interfaces) = std::fs::read_dir(&net) {
        for interface in interfaces.flatten() {
            let dir = interface.path();
            // Physical interfaces link to their device; virtual ones (bridges, veths,
            // tunnels) do not.
            if !dir.join("device").exists() {
                continue;
            }
            let relative = |file: &str| {
                Path::new("sys/class/net")
                    .join(interface.file_name())
                    .join(file)
            };
            let permanent =
                read(&relative("addr_assign_type")).is_some_and(|kind| kind == ADDRESS_PERMANENT);
            if let Some(address) = read(&relative("address"))
                && permanent
                && !address.is_empty()
                && address != NO_ADDRESS
            {
                parts.push(format!("mac={address}"));
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    // Interfaces are listed in no set order.
    parts.sort();
    let digest = ring::digest::digest(&ring::digest::SHA256, parts.join("\n").as_bytes());
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Some(hex[..DIGITS].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, contents: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    /// A device with a machine id, a Pi's serial, a wired and a wireless interface, a
    /// bridge and the loopback.
    fn device(root: &Path, machine_id: &str, serial: &str, wired: &str) {
        write(root, "etc/machine-id", &format!("{machine_id}\n"));
        write(
            root,
            "sys/firmware/devicetree/base/serial-number",
            &format!("{serial}\0"),
        );
        for (name, address, kind, physical) in [
            ("eth0", wired, "0", true),
            ("wlan0", "b8:27:eb:00:00:02", "0", true),
            ("br0", "02:42:ac:11:00:01", "3", false),
            ("lo", NO_ADDRESS, "0", false),
        ] {
            write(
                root,
                &format!("sys/class/net/{name}/address"),
                &format!("{address}\n"),
            );
            write(
                root,
                &format!("sys/class/net/{name}/addr_assign_type"),
                &format!("{kind}\n"),
            );
            if physical {
                std::fs::create_dir_all(root.join(format!("sys/class/net/{name}/device"))).unwrap();
            }
        }
    }

    #[test]
    fn copies_of_one_card_on_two_boards_differ_and_one_board_keeps_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        // The same card image (machine id) on two boards.
        device(
            &first,
            "3d1219c7c4c5404aaa1f6d2a48adfda4",
            "00000000a1b2c3d4",
            "b8:27:eb:00:00:01",
        );
        device(
            &second,
            "3d1219c7c4c5404aaa1f6d2a48adfda4",
            "00000000e5f6a7b8",
            "b8:27:eb:00:00:09",
        );
        let on_first = fingerprint_under(&first).unwrap();
        assert_eq!(on_first.len(), DIGITS);
        assert!(on_first.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_ne!(on_first, fingerprint_under(&second).unwrap());
        assert_eq!(fingerprint_under(&first), Some(on_first.clone()), "stable");

        // Neither a virtual interface's address nor a random one counts.
        write(&first, "sys/class/net/br0/address", "02:42:ac:11:00:99\n");
        write(&first, "sys/class/net/wlan0/addr_assign_type", "1\n");
        write(&first, "sys/class/net/wlan0/address", "7a:11:22:33:44:55\n");
        let without_wlan = fingerprint_under(&first).unwrap();
        write(&first, "sys/class/net/wlan0/address", "7a:99:88:77:66:55\n");
        assert_eq!(fingerprint_under(&first), Some(without_wlan));

        // Nothing to go by: no fingerprint.
        assert_eq!(fingerprint_under(&dir.path().join("empty")), None);
    }
}
