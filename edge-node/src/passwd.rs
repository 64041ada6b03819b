//! `silt-edge passwd FILE USER`: adds or updates a user in an MQTT password file, so an
//! operator with only the static binary needs no `mosquitto_passwd`. The file stays in
//! mosquitto_passwd's format (PBKDF2-SHA512 `$7$` lines), readable by both.
//!
//! The password is read from standard input (one line; a trailing newline is not part of it),
//! so it never shows in `ps` or the shell history: `silt-edge passwd /etc/silt/mqtt.passwd
//! sensor1 < secret`, or type it at the prompt.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};
use silt_gateways::mqtt::{PasswordFile, hash_password_line};

use crate::cli::PasswdArgs;

pub(crate) fn main(args: &PasswdArgs) -> anyhow::Result<()> {
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", args.file.display()));
        }
    };
    // Refuse to rewrite a file we could not load afterwards.
    PasswordFile::parse(&existing)
        .with_context(|| format!("{} is not a valid password file", args.file.display()))?;
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|line| line.split(':').next() != Some(args.username.as_str()))
        .map(str::to_string)
        .collect();
    let found = lines.len() != existing.lines().count();
    if args.delete {
        if !found {
            bail!("no user {} in {}", args.username, args.file.display());
        }
    } else {
        let password = read_password()?;
        lines.push(hash_password_line(&args.username, &password)?);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomically(&args.file, &text)
}

fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password (give it on standard input)");
    }
    Ok(password.to_string())
}

/// Writes next to the file, fsyncs, then renames over it: a crash leaves the old or the new.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
