//! Who may connect and what they may do: the broker's password file and its topic ACL.
//!
//! Both are plain data, loaded once from files an operator writes and then asked questions with
//! no IO and no async: [`PasswordFile::verify`] at CONNECT, [`AclRules`] at PUBLISH, at
//! SUBSCRIBE and again at delivery. Reloading is building a new value and swapping it in.
//!
//! The password file is mosquitto's, so the `mosquitto_passwd` an operator already has (Debian
//! package `mosquitto`) makes and edits it, and a file moved from a mosquitto broker keeps
//! working. The ACL file is our own, simpler than mosquitto's: see [`acl`] for its format.
//!
//! Files are read whole into memory, so both are bounded: [`AUTH_FILE_BYTES_MAX`] per file and
//! [`LINE_BYTES_MAX`] per line. Errors name the file and the line and never echo a password
//! hash, since error messages end up in logs that more people read than the file itself.
//!
//! # Layout
//! - [`password`]: mosquitto_passwd files (`$7$` PBKDF2-SHA512 and `$6$` SHA-512 hashes).
//! - [`acl`]: the rules file, first match wins, with `+`/`#` filters and `%u`/`%c`.

pub mod acl;
pub mod password;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use acl::{AclFault, AclRules, Identity};
pub use password::{HASH_ITERATIONS, PasswordFault, PasswordFile, hash_password_line};

use super::topic::TOPIC_BYTES_MAX;

/// The largest password or ACL file read: far above any real deployment (a password line is
/// about 150 bytes, so this is some 100,000 users), small enough that a wrong path (a disk
/// image, a log) fails fast instead of filling memory.
pub const AUTH_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The longest line of either file: a user name or topic filter may be a whole MQTT string
/// (65,535 bytes), plus room for the hash or the rule's words around it.
pub const LINE_BYTES_MAX: usize = TOPIC_BYTES_MAX + 1024;

/// Why a password or ACL file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is over [`AUTH_FILE_BYTES_MAX`].
    #[error("{} is larger than the {max_bytes}-byte limit", path.display())]
    TooLarge { path: PathBuf, max_bytes: u64 },
    /// A line of a password file is wrong. `path` is `None` for text given to `parse`.
    #[error("{}line {line}: {fault}", Origin(path.as_deref()))]
    Password {
        path: Option<PathBuf>,
        line: usize,
        fault: PasswordFault,
    },
    /// A line of an ACL file is wrong. `path` is `None` for text given to `parse`.
    #[error("{}line {line}: {fault}", Origin(path.as_deref()))]
    Acl {
        path: Option<PathBuf>,
        line: usize,
        fault: AclFault,
    },
    /// An ACL file with no rules: almost certainly a mistake (an emptied or wrong file), and
    /// its meaning would be a guess, so it is refused rather than read as allow-all or
    /// deny-all.
    #[error(
        "{}the ACL has no rules; to deny everything write `deny all any #`, \
         to allow everything leave the ACL out",
        Origin(path.as_deref())
    )]
    NoRules { path: Option<PathBuf> },
    /// [`hash_password_line`] was given a user name the file format cannot hold.
    #[error(
        "the user name cannot be stored in a password file: it is empty, longer than \
         {TOPIC_BYTES_MAX} bytes, contains ':' or a control character, starts with '#' \
         or has blanks at either end"
    )]
    InvalidUsername,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

impl AuthError {
    /// The 1-based line at fault, for errors about one line.
    pub fn line(&self) -> Option<usize> {
        match self {
            AuthError::Password { line, .. } | AuthError::Acl { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// Adds the file's path to an error from parsing its text.
    fn in_file(self, file: &Path) -> AuthError {
        match self {
            AuthError::Password { line, fault, .. } => AuthError::Password {
                path: Some(file.to_owned()),
                line,
                fault,
            },
            AuthError::Acl { line, fault, .. } => AuthError::Acl {
                path: Some(file.to_owned()),
                line,
                fault,
            },
            AuthError::NoRules { .. } => AuthError::NoRules {
                path: Some(file.to_owned()),
            },
            other => other,
        }
    }
}

/// Writes `"{path}: "` before a message about a file, or nothing for text without one.
struct Origin<'a>(Option<&'a Path>);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "{}: ", path.display()),
            None => Ok(()),
        }
    }
}

/// What is wrong with a line before either parser reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawLineFault {
    TooLong { bytes: usize },
    NotUtf8,
}

/// Reads a whole file, refusing one over [`AUTH_FILE_BYTES_MAX`] without reading it all.
fn read_bounded(path: &Path) -> Result<Vec<u8>, AuthError> {
    let read_error = |source| AuthError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    // `take` rather than the file's length: a FIFO or a growing file has no honest length.
    file.take(AUTH_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > AUTH_FILE_BYTES_MAX {
        return Err(AuthError::TooLarge {
            path: path.to_owned(),
            max_bytes: AUTH_FILE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// The lines of a file's bytes, numbered from 1, each checked for length and UTF-8, with a
/// trailing `\r` removed so files edited on Windows read the same.
fn numbered_lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Result<&str, RawLineFault>)> {
    bytes
        .split(|&byte| byte == b'\n')
        .enumerate()
        .map(|(index, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let checked = if line.len() > LINE_BYTES_MAX {
                Err(RawLineFault::TooLong { bytes: line.len() })
            } else {
                std::str::from_utf8(line).map_err(|_| RawLineFault::NotUtf8)
            };
            (index + 1, checked)
        })
}

/// True for lines both formats skip: blank, or a comment whose first non-blank is `#`.
fn is_blank_or_comment(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed.is_empty() || trimmed.starts_with('#')
}
