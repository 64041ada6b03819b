//! Password files in mosquitto_passwd's format: user names and salted password hashes.
//!
//! One user a line, `name:hash`, where the hash is one of the two forms mosquitto writes:
//!
//! ```text
//! alice:$7$101$<salt base64>$<hash base64>   PBKDF2-HMAC-SHA512, <iterations> rounds (mosquitto 2.x)
//! bob:$6$<salt base64>$<hash base64>         SHA-512 over the password then the salt (mosquitto 1.x)
//! ```
//!
//! The hash is always 64 bytes (SHA-512's output), base64 with padding. mosquitto 2.0 writes
//! 12-byte salts and later versions longer ones; any salt of [`SALT_BYTES_MIN`] to
//! [`SALT_BYTES_MAX`] bytes is accepted. Blank lines and lines whose first non-blank is `#`
//! are skipped; blanks around the name and the hash are ignored, as mosquitto does.
//!
//! Unlike mosquitto, which logs a bad line and drops that user, a bad line fails the whole
//! file: a broker that starts with some users silently locked out is harder to debug than
//! one that refuses to start and names the line. Plain-text passwords (mosquitto without
//! TLS support reads them) are refused for the same reason.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac, pbkdf2};

use super::{AuthError, RawLineFault, is_blank_or_comment, numbered_lines, read_bounded};
use crate::mqtt::topic::TOPIC_BYTES_MAX;

/// PBKDF2 rounds for hashes that [`hash_password_line`] writes.
///
/// mosquitto uses 101, which costs an attacker with a stolen file almost nothing. Every round
/// costs us too, though, on every CONNECT: a round is two SHA-512 blocks, about 0.7 µs on a
/// current x86 core (measured) and, estimated from SHA-512 speeds, 1.5-4 µs on a Raspberry
/// Pi 3/4 core. 2,000 rounds is then 1.5 ms here and 3-8 ms on a Pi, so a thousand sensors
/// reconnecting at once after a network blip cost a Pi core seconds, not minutes, and the
/// connect-rate limit spreads that out. It is twenty times mosquitto's work factor for an
/// offline guesser. Files made by `mosquitto_passwd` keep their own count, read from each
/// line.
pub const HASH_ITERATIONS: u32 = 2_000;

/// [`HASH_ITERATIONS`] as ring takes it; checked when compiling.
const HASH_ITERATIONS_NONZERO: NonZeroU32 = match NonZeroU32::new(HASH_ITERATIONS) {
    Some(iterations) => iterations,
    None => panic!("HASH_ITERATIONS must not be zero"),
};

/// The most PBKDF2 rounds a line may ask for: a typo of a few extra digits would otherwise
/// make every CONNECT of that user (and of unknown users, see [`PasswordFile::verify`]) take
/// seconds or hours.
pub const ITERATIONS_MAX: u32 = 1_000_000;

/// The salt length [`hash_password_line`] writes: what mosquitto 2.0 writes and the only length
/// its reader accepts, so our lines work in a mosquitto broker too. 96 random bits are plenty
/// for a salt, whose job is only to be unique.
pub const SALT_BYTES: usize = 12;

/// The shortest salt accepted in a file.
pub const SALT_BYTES_MIN: usize = 8;

/// The longest salt accepted in a file (later mosquitto versions write 64 bytes).
pub const SALT_BYTES_MAX: usize = 64;

/// SHA-512's output, the length of every stored hash.
const HASH_BYTES: usize = 64;

/// What is wrong with one line of a password file. No variant carries the hash text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordFault {
    #[error("the line is {bytes} bytes long, more than the {max}-byte limit", max = super::LINE_BYTES_MAX)]
    LineTooLong { bytes: usize },
    #[error("the line is not valid UTF-8")]
    NotUtf8,
    #[error("expected `user:hash`, but the line has no ':'")]
    MissingColon,
    #[error("the user name is empty")]
    EmptyUsername,
    #[error("the user name is longer than {TOPIC_BYTES_MAX} bytes")]
    UsernameTooLong,
    #[error("user {username:?} is already defined on line {first_line}")]
    DuplicateUser { username: String, first_line: usize },
    #[error(
        "the password is not hashed; hash the file with `mosquitto_passwd -U FILE` \
         or make each line with `mosquitto_passwd -b FILE USER PASSWORD`"
    )]
    NotHashed,
    #[error(
        "hash type ${scheme}$ is not supported; only $7$ (PBKDF2-SHA512) and $6$ (SHA-512) \
         are; make the line with `mosquitto_passwd -H sha512-pbkdf2`"
    )]
    UnsupportedScheme { scheme: String },
    #[error("expected {expected} '$'-separated fields after the hash type")]
    WrongFieldCount { expected: usize },
    #[error("the iteration count is not a number from 1 to {ITERATIONS_MAX}")]
    BadIterations,
    #[error("the salt is not base64 of {SALT_BYTES_MIN} to {SALT_BYTES_MAX} bytes")]
    BadSalt,
    #[error("the hash is not base64 of {HASH_BYTES} bytes")]
    BadHash,
}

/// How a stored hash was made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `$6$`: SHA-512 over the password bytes, then the salt.
    Sha512,
    /// `$7$`: PBKDF2 with HMAC-SHA512.
    Pbkdf2Sha512 { iterations: NonZeroU32 },
}

impl Scheme {
    /// Roughly how much work one verification is, to give unknown users the costliest.
    fn cost(self) -> u32 {
        match self {
            Scheme::Sha512 => 0,
            Scheme::Pbkdf2Sha512 { iterations } => iterations.get(),
        }
    }
}

/// One user's salted hash.
#[derive(Clone)]
struct StoredHash {
    scheme: Scheme,
    salt: Box<[u8]>,
    hash: [u8; HASH_BYTES],
}

/// A loaded password file: which users exist and how to check their passwords.
///
/// `Debug` shows only the number of users; hashes never reach a log.
#[derive(Clone)]
pub struct PasswordFile {
    users: HashMap<Box<str>, StoredHash>,
    /// Verified instead when the user is unknown, so that "no such user" takes as long as
    /// "wrong password" and response times do not reveal which user names exist. Its hash
    /// is random, so nothing verifies against it.
    decoy: StoredHash,
    /// A random key for comparing `$6$` digests by their HMACs (see `verify_sha512`).
    compare_key: hmac::Key,
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Reads and parses a password file of at most [`super::AUTH_FILE_BYTES_MAX`] bytes.
    pub fn load(path: &Path) -> Result<PasswordFile, AuthError> {
        let bytes = read_bounded(path)?;
        Self::parse_bytes(&bytes).map_err(|error| error.in_file(path))
    }

    /// Parses the text of a password file. Errors name the line but no file.
    pub fn parse(text: &str) -> Result<PasswordFile, AuthError> {
        Self::parse_bytes(text.as_bytes())
    }

    fn parse_bytes(bytes: &[u8]) -> Result<PasswordFile, AuthError> {
        let mut users: HashMap<Box<str>, StoredHash> = HashMap::new();
        let mut first_lines: HashMap<Box<str>, usize> = HashMap::new();
        for (line_number, line) in numbered_lines(bytes) {
            let fault = |fault| AuthError::Password {
                path: None,
                line: line_number,
                fault,
            };
            let line = line.map_err(|raw| {
                fault(match raw {
                    RawLineFault::TooLong { bytes } => PasswordFault::LineTooLong { bytes },
                    RawLineFault::NotUtf8 => PasswordFault::NotUtf8,
                })
            })?;
            if is_blank_or_comment(line) {
                continue;
            }
            let (username, stored) = parse_line(line).map_err(fault)?;
            match first_lines.entry(username.into()) {
                MapEntry::Occupied(first) => {
                    return Err(fault(PasswordFault::DuplicateUser {
                        username: username.to_owned(),
                        first_line: *first.get(),
                    }));
                }
                MapEntry::Vacant(slot) => {
                    slot.insert(line_number);
                }
            }
            users.insert(username.into(), stored);
        }
        let rng = SystemRandom::new();
        let decoy_scheme = users
            .values()
            .map(|stored| stored.scheme)
            .max_by_key(|scheme| scheme.cost())
            .unwrap_or(Scheme::Sha512);
        let mut decoy = StoredHash {
            scheme: decoy_scheme,
            salt: vec![0; SALT_BYTES].into_boxed_slice(),
            hash: [0; HASH_BYTES],
        };
        rng.fill(&mut decoy.salt).map_err(|_| AuthError::Random)?;
        rng.fill(&mut decoy.hash).map_err(|_| AuthError::Random)?;
        let compare_key =
            hmac::Key::generate(hmac::HMAC_SHA512, &rng).map_err(|_| AuthError::Random)?;
        Ok(PasswordFile {
            users,
            decoy,
            compare_key,
        })
    }

    /// True when `username` exists and `password` is its password.
    ///
    /// The comparison is constant-time, and an unknown user costs as much as the costliest
    /// hash in the file, so timing tells an attacker neither how close a guess was nor which
    /// user names exist. A PBKDF2 verification is CPU work of milliseconds (see
    /// [`HASH_ITERATIONS`]); async callers should run it off the IO threads.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        let (stored, known) = match self.users.get(username) {
            Some(stored) => (stored, true),
            None => (&self.decoy, false),
        };
        let matches = match stored.scheme {
            Scheme::Pbkdf2Sha512 { iterations } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                iterations,
                &stored.salt,
                password,
                &stored.hash,
            )
            .is_ok(),
            Scheme::Sha512 => self.verify_sha512(stored, password),
        };
        matches && known
    }

    /// Checks a `$6$` hash. ring has no public constant-time comparison, so the two digests
    /// are compared through their HMACs under a random key ("double HMAC"): `hmac::verify`
    /// compares in constant time, and any timing it leaks is about values an attacker cannot
    /// predict without the key.
    fn verify_sha512(&self, stored: &StoredHash, password: &[u8]) -> bool {
        let mut context = digest::Context::new(&digest::SHA512);
        context.update(password);
        context.update(&stored.salt);
        let computed = context.finish();
        let expected_tag = hmac::sign(&self.compare_key, &stored.hash);
        hmac::verify(&self.compare_key, computed.as_ref(), expected_tag.as_ref()).is_ok()
    }

    /// How many users the file defines.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True for a file with no users, which lets nobody in by password.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Splits `user:hash` and decodes the hash.
fn parse_line(line: &str) -> Result<(&str, StoredHash), PasswordFault> {
    let (username, hash) = line.split_once(':').ok_or(PasswordFault::MissingColon)?;
    let username = username.trim();
    if username.is_empty() {
        return Err(PasswordFault::EmptyUsername);
    }
    if username.len() > TOPIC_BYTES_MAX {
        return Err(PasswordFault::UsernameTooLong);
    }
    let stored = parse_hash(hash.trim())?;
    Ok((username, stored))
}

/// Decodes `$7$<iterations>$<salt>$<hash>` or `$6$<salt>$<hash>`.
fn parse_hash(text: &str) -> Result<StoredHash, PasswordFault> {
    let Some(rest) = text.strip_prefix('$') else {
        return Err(PasswordFault::NotHashed);
    };
    let mut fields = rest.split('$');
    let scheme_name = fields.next().unwrap_or_default();
    let fields: Vec<&str> = fields.collect();
    let (scheme, salt, hash) = match scheme_name {
        "7" => {
            let [iterations, salt, hash] = fields[..] else {
                return Err(PasswordFault::WrongFieldCount { expected: 3 });
            };
            let iterations = parse_iterations(iterations)?;
            (Scheme::Pbkdf2Sha512 { iterations }, salt, hash)
        }
        "6" => {
            let [salt, hash] = fields[..] else {
                return Err(PasswordFault::WrongFieldCount { expected: 2 });
            };
            (Scheme::Sha512, salt, hash)
        }
        other => {
            // The scheme name is not secret, but keep a garbage line's echo short.
            let scheme = other.chars().take(16).collect();
            return Err(PasswordFault::UnsupportedScheme { scheme });
        }
    };
    let salt = BASE64
        .decode(salt)
        .ok()
        .filter(|salt| (SALT_BYTES_MIN..=SALT_BYTES_MAX).contains(&salt.len()))
        .ok_or(PasswordFault::BadSalt)?;
    let hash = BASE64
        .decode(hash)
        .ok()
        .and_then(|hash| <[u8; HASH_BYTES]>::try_from(hash).ok())
        .ok_or(PasswordFault::BadHash)?;
    Ok(StoredHash {
        scheme,
        salt: salt.into_boxed_slice(),
        hash,
    })
}

fn parse_iterations(text: &str) -> Result<NonZeroU32, PasswordFault> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(PasswordFault::BadIterations);
    }
    text.parse::<u32>()
        .ok()
        .filter(|&iterations| iterations <= ITERATIONS_MAX)
        .and_then(NonZeroU32::new)
        .ok_or(PasswordFault::BadIterations)
}

/// Makes one password file line, `username:$7$...`, for `password`: PBKDF2-HMAC-SHA512 with
/// [`HASH_ITERATIONS`] rounds and a fresh random [`SALT_BYTES`]-byte salt. The line has no
/// trailing newline. mosquitto 2.0 reads it too.
///
/// Fails for a user name the format cannot hold (empty, over 65,535 bytes, with `:` or a
/// control character, starting with `#`, or with blanks at either end, which the reader
/// would trim), and if the system random number generator fails.
pub fn hash_password_line(username: &str, password: &str) -> Result<String, AuthError> {
    let storable = !username.is_empty()
        && username.len() <= TOPIC_BYTES_MAX
        && !username.contains(':')
        && !username.chars().any(char::is_control)
        && !username.starts_with('#')
        && username.trim() == username;
    if !storable {
        return Err(AuthError::InvalidUsername);
    }
    let mut salt = [0u8; SALT_BYTES];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| AuthError::Random)?;
    let mut hash = [0u8; HASH_BYTES];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        HASH_ITERATIONS_NONZERO,
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    Ok(format!(
        "{username}:$7${HASH_ITERATIONS}${}${}",
        BASE64.encode(salt),
        BASE64.encode(hash)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterations_must_be_plain_bounded_numbers() {
        assert_eq!(parse_iterations("101").map(NonZeroU32::get), Ok(101));
        for bad in ["", "0", "+5", "-1", " 5", "1e3", "99999999999", "1000001"] {
            assert_eq!(
                parse_iterations(bad),
                Err(PasswordFault::BadIterations),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_users_cost_the_costliest_scheme() {
        let text = format!(
            "{}\n{}\n",
            hash_password_line("a", "x").unwrap(),
            "b:$6$A/tcSMqIQiqUwnlP$kB97Dq+updhMKF3SPTkx+sM6OmjjD4JzCIyaGUCl3Wzi+JtmYrTvPM6jE1FOegb7q4PimYdjPL+Ao+mrcrFd5A=="
        );
        let file = PasswordFile::parse(&text).unwrap();
        assert!(
            file.decoy.scheme
                == Scheme::Pbkdf2Sha512 {
                    iterations: HASH_ITERATIONS_NONZERO
                }
        );
        assert!(!file.verify("nobody", b"x"));
    }
}
