//! Per-topic access rules: who may publish to, subscribe to and receive from which topics.
//!
//! # File format
//!
//! One rule a line; blank lines and lines whose first non-blank is `#` are skipped:
//!
//! ```text
//! # effect  action     who             topic filter
//! allow     publish    user:sensor-7   plant/line1/#
//! deny      subscribe  any             plant/+/secrets/#
//! allow     all        any             users/%u/#
//! allow     subscribe  client:dash-1   plant/#
//! ```
//!
//! - effect: `allow` or `deny`;
//! - action: `publish`, `subscribe` (which governs both subscribing and receiving) or `all`;
//! - who: `user:<name>` (the CONNECT user name, exactly), `client:<id>` (the client id) or
//!   `any` (everyone, anonymous clients included); names cannot contain blanks;
//! - topic filter: the rest of the line, blanks at either end trimmed, with `+` and `#` as in
//!   MQTT and these substitutions inside levels: `%u` the user name, `%c` the client id, `%%`
//!   a literal `%`. Any other `%` is an error, so a typo does not silently match nothing.
//!
//! Rules are tried in file order and the first that applies decides; when none applies,
//! access is denied. A file with no rules is refused ([`AuthError::NoRules`]).
//!
//! # Matching
//!
//! - publish: a rule applies when its filter matches the topic name.
//! - subscribe: an `allow` applies only when its filter covers every topic the subscribed
//!   filter can match (`allow a/#` admits `a/+/b` but not `#`); a `deny` applies as soon as
//!   the two filters can match a common topic (`deny a/secret` refuses `#` and `+/secret`).
//!   A shared subscription is checked by its inner filter.
//! - receive ([`AclRules::allows_receive`]): checked per message at delivery, with
//!   `subscribe` and `all` rules, like publish. Under unchanged rules every message a granted
//!   subscription matches passes; the check matters after a reload and for retained messages.
//! - `$` topics: as in MQTT, a filter whose first level is `+` or `#` does not match topic
//!   names starting with `$`, so `allow all any #` grants nothing under `$SYS`.
//!
//! # Substitutions never widen access
//!
//! A `%u` or `%c` value is usable only when it exists (anonymous clients have no user name),
//! is not empty, contains none of `+`, `#`, `/` or U+0000, and, where it begins the filter,
//! does not start with `$` (a user named `$SYS` must not get `$SYS/#` from `%u/#`). When a
//! value is not usable, an `allow` rule does not apply, and a `deny` rule applies as though
//! the level holding it were a wildcard that matches any value: the rule denies what it would
//! deny for every possible user.

use std::path::Path;

use super::{AuthError, RawLineFault, is_blank_or_comment, numbered_lines, read_bounded};
use crate::mqtt::topic::{
    LEVEL_SEPARATOR, MULTI_LEVEL_WILDCARD, SINGLE_LEVEL_WILDCARD, TopicError, TopicFilter,
    TopicName,
};

/// Who is asking: what the rules' `user:`, `client:`, `%u` and `%c` refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// The client id, as assigned by the server when the client sent an empty one.
    pub client_id: &'a str,
    /// The authenticated user name (or certificate Common Name); `None` for anonymous.
    pub username: Option<&'a str>,
}

/// What is wrong with one line of an ACL file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclFault {
    #[error("the line is {bytes} bytes long, more than the {max}-byte limit", max = super::LINE_BYTES_MAX)]
    LineTooLong { bytes: usize },
    #[error("the line is not valid UTF-8")]
    NotUtf8,
    #[error("expected `allow|deny publish|subscribe|all user:NAME|client:ID|any FILTER`")]
    Incomplete,
    #[error("expected `allow` or `deny`, found {0:?}")]
    UnknownEffect(String),
    #[error("expected `publish`, `subscribe` or `all`, found {0:?}")]
    UnknownAction(String),
    #[error("expected `user:NAME`, `client:ID` or `any`, found {0:?}")]
    UnknownSubject(String),
    #[error("unknown substitution `%{0}`; use %u (user name), %c (client id) or %% (a '%')")]
    UnknownSubstitution(char),
    #[error("a level ends with '%'; write %% for a literal '%'")]
    TrailingPercent,
    #[error("the topic filter is invalid: {0}")]
    InvalidFilter(TopicError),
}

/// A loaded ACL: rules in file order, first match wins, no match denies.
#[derive(Debug, Clone)]
pub struct AclRules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Publish,
    Subscribe,
    All,
}

impl Action {
    fn covers_publish(self) -> bool {
        matches!(self, Action::Publish | Action::All)
    }

    fn covers_subscribe(self) -> bool {
        matches!(self, Action::Subscribe | Action::All)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    User(Box<str>),
    Client(Box<str>),
    Any,
}

impl Subject {
    fn includes(&self, who: &Identity<'_>) -> bool {
        match self {
            Subject::User(name) => who.username == Some(&**name),
            Subject::Client(id) => who.client_id == &**id,
            Subject::Any => true,
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    effect: Effect,
    action: Action,
    subject: Subject,
    filter: Pattern,
}

/// A rule's topic filter before substitution.
#[derive(Debug, Clone)]
struct Pattern {
    levels: Vec<PatternLevel>,
    /// The first level is `+` or `#`, so `$` topic names never match (MQTT §4.7.2).
    skips_dollar: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternLevel {
    /// A level matched exactly once substituted: literal text and placeholders, in order.
    Exact(Vec<Piece>),
    /// `+`.
    One,
    /// `#`.
    Many,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Box<str>),
    Username,
    ClientId,
}

/// A pattern level after substitution, borrowing from the rule.
#[derive(Debug, Clone, Copy)]
enum Level<'r> {
    /// Literal pieces whose placeholders all have usable values.
    Exact(&'r [Piece]),
    /// `+`, or a level of a `deny` rule whose placeholder had no usable value.
    One,
    /// `#`.
    Many,
}

/// The values `%u` and `%c` stand for, in one check.
#[derive(Debug, Clone, Copy)]
struct Values<'a> {
    username: Option<&'a str>,
    client_id: &'a str,
}

impl<'a> Values<'a> {
    /// The value a placeholder stands for; `None` for text and for an anonymous `%u`.
    fn of(self, piece: &Piece) -> Option<&'a str> {
        match piece {
            Piece::Text(_) => None,
            Piece::Username => self.username,
            Piece::ClientId => Some(self.client_id),
        }
    }
}

impl AclRules {
    /// Reads and parses an ACL file of at most [`super::AUTH_FILE_BYTES_MAX`] bytes.
    pub fn load(path: &Path) -> Result<AclRules, AuthError> {
        let bytes = read_bounded(path)?;
        Self::parse_bytes(&bytes).map_err(|error| error.in_file(path))
    }

    /// Parses the text of an ACL file. Errors name the line but no file.
    pub fn parse(text: &str) -> Result<AclRules, AuthError> {
        Self::parse_bytes(text.as_bytes())
    }

    fn parse_bytes(bytes: &[u8]) -> Result<AclRules, AuthError> {
        let mut rules = Vec::new();
        for (line_number, line) in numbered_lines(bytes) {
            let fault = |fault| AuthError::Acl {
                path: None,
                line: line_number,
                fault,
            };
            let line = line.map_err(|raw| {
                fault(match raw {
                    RawLineFault::TooLong { bytes } => AclFault::LineTooLong { bytes },
                    RawLineFault::NotUtf8 => AclFault::NotUtf8,
                })
            })?;
            if is_blank_or_comment(line) {
                continue;
            }
            rules.push(parse_rule(line).map_err(fault)?);
        }
        if rules.is_empty() {
            return Err(AuthError::NoRules { path: None });
        }
        Ok(AclRules { rules })
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Always false: a loaded ACL has at least one rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `who` may publish to `topic` (and set a will on it).
    pub fn allows_publish(&self, who: &Identity<'_>, topic: &TopicName) -> bool {
        self.decide(who, Action::covers_publish, |_, rule| {
            matches_topic(rule, topic)
        })
    }

    /// Whether `who` may subscribe to `filter` (for a shared subscription, its inner filter).
    pub fn allows_subscribe(&self, who: &Identity<'_>, filter: &TopicFilter) -> bool {
        self.decide(who, Action::covers_subscribe, |effect, rule| match effect {
            Effect::Allow => covers(rule, filter),
            Effect::Deny => overlaps(rule, filter),
        })
    }

    /// Whether a message published to `topic` may be delivered to `who`, checked at delivery
    /// so that rules reloaded after a SUBSCRIBE, and retained messages, are still obeyed.
    pub fn allows_receive(&self, who: &Identity<'_>, topic: &TopicName) -> bool {
        self.decide(who, Action::covers_subscribe, |_, rule| {
            matches_topic(rule, topic)
        })
    }

    /// First match wins over the rules of one action; `applies` says whether a rule does.
    fn decide(
        &self,
        who: &Identity<'_>,
        action: fn(Action) -> bool,
        applies: impl Fn(Effect, Resolved<'_, '_>) -> bool,
    ) -> bool {
        let values = Values {
            username: who.username,
            client_id: who.client_id,
        };
        for rule in &self.rules {
            if !action(rule.action) || !rule.subject.includes(who) {
                continue;
            }
            let Some(resolved) = Resolved::new(rule, values) else {
                continue;
            };
            if applies(rule.effect, resolved) {
                return rule.effect == Effect::Allow;
            }
        }
        false
    }
}

/// Parses `effect action who filter`.
fn parse_rule(line: &str) -> Result<Rule, AclFault> {
    let (effect, rest) = next_word(line).ok_or(AclFault::Incomplete)?;
    let (action, rest) = next_word(rest).ok_or(AclFault::Incomplete)?;
    let (subject, rest) = next_word(rest).ok_or(AclFault::Incomplete)?;
    let filter = rest.trim();
    if filter.is_empty() {
        return Err(AclFault::Incomplete);
    }
    let effect = match effect {
        "allow" => Effect::Allow,
        "deny" => Effect::Deny,
        other => return Err(AclFault::UnknownEffect(shorten(other))),
    };
    let action = match action {
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "all" => Action::All,
        other => return Err(AclFault::UnknownAction(shorten(other))),
    };
    let subject = if subject == "any" {
        Subject::Any
    } else if let Some(name) = subject
        .strip_prefix("user:")
        .filter(|name| !name.is_empty())
    {
        Subject::User(name.into())
    } else if let Some(id) = subject.strip_prefix("client:").filter(|id| !id.is_empty()) {
        Subject::Client(id.into())
    } else {
        return Err(AclFault::UnknownSubject(shorten(subject)));
    };
    Ok(Rule {
        effect,
        action,
        subject,
        filter: parse_pattern(filter)?,
    })
}

/// The first blank-separated word and what follows it, or `None` at the end of the line.
fn next_word(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    if text.is_empty() {
        return None;
    }
    Some(text.split_once(char::is_whitespace).unwrap_or((text, "")))
}

/// A word quoted in an error, cut short so a garbage line does not flood the log.
fn shorten(word: &str) -> String {
    word.chars().take(64).collect()
}

/// Parses a filter with substitutions, checking it the way MQTT checks a filter.
fn parse_pattern(text: &str) -> Result<Pattern, AclFault> {
    let mut levels = Vec::new();
    // The filter as it would read with every placeholder replaced by a plain value; it must
    // be a valid MQTT filter, which catches `a+`, `#/a`, U+0000 and the like.
    let mut probe = String::with_capacity(text.len());
    for (index, raw) in text.split(LEVEL_SEPARATOR).enumerate() {
        if index > 0 {
            probe.push(LEVEL_SEPARATOR);
        }
        let level = match raw {
            SINGLE_LEVEL_WILDCARD => PatternLevel::One,
            MULTI_LEVEL_WILDCARD => PatternLevel::Many,
            _ => PatternLevel::Exact(parse_pieces(raw)?),
        };
        match &level {
            PatternLevel::Exact(pieces) => {
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => probe.push_str(text),
                        Piece::Username | Piece::ClientId => probe.push('x'),
                    }
                }
            }
            PatternLevel::One | PatternLevel::Many => probe.push_str(raw),
        }
        levels.push(level);
    }
    TopicFilter::new(&probe).map_err(AclFault::InvalidFilter)?;
    let skips_dollar = matches!(levels.first(), Some(PatternLevel::One | PatternLevel::Many));
    Ok(Pattern {
        levels,
        skips_dollar,
    })
}

/// Splits a level into literal text and `%u`/`%c` placeholders.
fn parse_pieces(raw: &str) -> Result<Vec<Piece>, AclFault> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = raw.chars();
    while let Some(character) = chars.next() {
        if character != '%' {
            text.push(character);
            continue;
        }
        let placeholder = match chars.next() {
            Some('%') => {
                text.push('%');
                continue;
            }
            Some('u') => Piece::Username,
            Some('c') => Piece::ClientId,
            Some(other) => return Err(AclFault::UnknownSubstitution(other)),
            None => return Err(AclFault::TrailingPercent),
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text).into()));
        }
        pieces.push(placeholder);
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text.into()));
    }
    Ok(pieces)
}

/// A rule's filter seen with one client's `%u` and `%c` values; levels are resolved as the
/// matchers walk them, so a check allocates nothing.
#[derive(Debug, Clone, Copy)]
struct Resolved<'r, 'v> {
    levels: &'r [PatternLevel],
    skips_dollar: bool,
    deny: bool,
    values: Values<'v>,
}

impl<'r, 'v> Resolved<'r, 'v> {
    /// `None` when an `allow` rule cannot be used because a substitution has no usable value
    /// (see the module docs).
    fn new(rule: &'r Rule, values: Values<'v>) -> Option<Self> {
        let deny = rule.effect == Effect::Deny;
        let usable = deny
            || rule
                .filter
                .levels
                .iter()
                .enumerate()
                .all(|(index, level)| match level {
                    PatternLevel::Exact(pieces) => pieces_usable(pieces, index == 0, values),
                    PatternLevel::One | PatternLevel::Many => true,
                });
        usable.then_some(Resolved {
            levels: &rule.filter.levels,
            skips_dollar: rule.filter.skips_dollar,
            deny,
            values,
        })
    }

    /// The level at `index`: a `deny` rule's level whose substitution has no usable value
    /// matches any value, as `+` does.
    fn get(&self, index: usize) -> Option<Level<'r>> {
        Some(match self.levels.get(index)? {
            PatternLevel::One => Level::One,
            PatternLevel::Many => Level::Many,
            PatternLevel::Exact(pieces) => {
                if !self.deny || pieces_usable(pieces, index == 0, self.values) {
                    Level::Exact(pieces)
                } else {
                    Level::One
                }
            }
        })
    }

    /// Whether a resolved exact level reads exactly `level`.
    fn equals(&self, pieces: &[Piece], level: &str) -> bool {
        exact_equals(pieces, self.values, level)
    }
}

/// Whether every placeholder of a level has a value that keeps the level one exact level.
fn pieces_usable(pieces: &[Piece], first_level: bool, values: Values<'_>) -> bool {
    pieces.iter().enumerate().all(|(position, piece)| {
        if matches!(piece, Piece::Text(_)) {
            return true;
        }
        let Some(value) = values.of(piece) else {
            return false;
        };
        let starts_filter = first_level && position == 0;
        let widens = value.is_empty()
            || value.contains(['+', '#', LEVEL_SEPARATOR, '\0'])
            || (starts_filter && value.starts_with('$'));
        !widens
    })
}

/// Whether a resolved exact level reads exactly `level`, without building the string.
fn exact_equals(pieces: &[Piece], values: Values<'_>, level: &str) -> bool {
    let mut rest = level;
    for piece in pieces {
        let part = match piece {
            Piece::Text(text) => &**text,
            Piece::Username => values.username.unwrap_or_default(),
            Piece::ClientId => values.client_id,
        };
        match rest.strip_prefix(part) {
            Some(after) => rest = after,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether a resolved exact level starts with `$`, which only literal text can make it do.
fn exact_starts_with_dollar(pieces: &[Piece]) -> bool {
    matches!(pieces.first(), Some(Piece::Text(text)) if text.starts_with('$'))
}

/// Whether the rule matches a topic name, with the `$` rule.
fn matches_topic(rule: Resolved<'_, '_>, topic: &TopicName) -> bool {
    if rule.skips_dollar && topic.is_dollar() {
        return false;
    }
    let mut topic_levels = topic.levels();
    let mut index = 0;
    loop {
        match (rule.get(index), topic_levels.next()) {
            // `#` matches the parent level too: `a/#` matches `a`.
            (Some(Level::Many), _) => return true,
            (Some(Level::One), Some(_)) => {}
            (Some(Level::Exact(pieces)), Some(level)) if rule.equals(pieces, level) => {}
            (None, None) => return true,
            _ => return false,
        }
        index += 1;
    }
}

/// Whether every topic `filter` can match is matched by the rule.
fn covers(rule: Resolved<'_, '_>, filter: &TopicFilter) -> bool {
    // A filter starting with `$` matches only `$` names; one starting otherwise matches none
    // (a leading wildcard skips them), so one check at the start settles the `$` rule.
    if rule.skips_dollar && filter.as_str().starts_with('$') {
        return false;
    }
    let first_level_empty = filter.as_str().starts_with(LEVEL_SEPARATOR);
    let mut filter_level_count = 0;
    for (index, filter_level) in filter.levels().enumerate() {
        filter_level_count = index + 1;
        match (rule.get(index), filter_level) {
            (Some(Level::Many), _) => return true,
            (Some(rule_level), MULTI_LEVEL_WILDCARD) => {
                // The filter's `#` matches any depth and its parent level too, which only a
                // `#` covers; unless that parent would be the empty string, which is no
                // topic (`#`, `/#`): then `+/#` (or `/+/#`) matches the same names.
                let no_parent = index == 0 || (index == 1 && first_level_empty);
                return no_parent
                    && matches!(rule_level, Level::One)
                    && matches!(rule.get(index + 1), Some(Level::Many));
            }
            (Some(Level::One), _) => {}
            (Some(Level::Exact(_)), SINGLE_LEVEL_WILDCARD) => return false,
            (Some(Level::Exact(pieces)), level) if rule.equals(pieces, level) => {}
            _ => return false,
        }
    }
    // The filter ends here: so must the rule, or go on with a `#`, which matches its parent.
    matches!(rule.get(filter_level_count), None | Some(Level::Many))
}

/// Whether some topic name is matched both by the rule and by `filter`.
fn overlaps(rule: Resolved<'_, '_>, filter: &TopicFilter) -> bool {
    let rule_first = rule.get(0);
    // Only the first level decides the `$` rule: when one side fixes it to a `$` name, the
    // other must not skip those. Wildcards against wildcards can always pick a plain name.
    let rule_fixes_dollar = matches!(
        rule_first,
        Some(Level::Exact(pieces)) if exact_starts_with_dollar(pieces)
    );
    if (rule.skips_dollar && filter.as_str().starts_with('$'))
        || (rule_fixes_dollar && filter.starts_with_wildcard())
    {
        return false;
    }
    // Whether a common topic's first level can only be empty; a topic of that level alone
    // would be the empty string, which is no topic.
    let first_level_empty = matches!(rule_first, Some(Level::Exact(pieces)) if pieces.is_empty())
        || filter.as_str().starts_with(LEVEL_SEPARATOR);
    let mut filter_levels = filter.levels();
    let mut index = 0;
    loop {
        match (rule.get(index), filter_levels.next()) {
            // A `#` against further levels: those levels, instantiated, are a common topic.
            (Some(Level::Many), Some(_)) | (Some(_), Some(MULTI_LEVEL_WILDCARD)) => return true,
            // A `#` against the other's end: only the levels so far, through `#`'s parent rule.
            (Some(Level::Many), None) | (None, Some(MULTI_LEVEL_WILDCARD)) => {
                return !(index == 1 && first_level_empty);
            }
            (Some(Level::One), Some(_)) | (Some(Level::Exact(_)), Some(SINGLE_LEVEL_WILDCARD)) => {}
            (Some(Level::Exact(pieces)), Some(level)) if rule.equals(pieces, level) => {}
            (None, None) => return true,
            _ => return false,
        }
        index += 1;
    }
}
