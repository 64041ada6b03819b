//! MQTT topic names and topic filters (3.1.1 §4.7, 5.0 §4.7 and §4.8.2): validation, matching
//! with the `$`-topic rule, and `$share/{ShareName}/{filter}` shared-subscription filters.
//!
//! Both protocol versions agree on these rules, so one set of types serves both:
//! - a topic name or filter is a non-empty UTF-8 string of at most [`TOPIC_BYTES_MAX`] bytes
//!   with no U+0000;
//! - `/` separates levels, and empty levels are valid (`a//b`, `/a`, `a/`);
//! - a filter may use `+` (one level) and `#` (this level and every level below it) only as
//!   whole levels, and `#` only as the last level; a name never contains either;
//! - a filter whose first character is a wildcard does not match a name starting with `$`
//!   (`#` and `+/x` do not match `$SYS/x`), so server topics stay out of catch-all subscriptions.

use std::fmt;

use super::reason;

/// The longest topic name or filter: an MQTT UTF-8 string has a two-byte length (§1.5.4).
pub const TOPIC_BYTES_MAX: usize = 65_535;

/// The level separator.
pub const LEVEL_SEPARATOR: char = '/';

/// The single-level wildcard, valid only as a whole level of a filter.
pub const SINGLE_LEVEL_WILDCARD: &str = "+";

/// The multi-level wildcard, valid only as the whole last level of a filter.
pub const MULTI_LEVEL_WILDCARD: &str = "#";

/// The prefix that makes a subscription filter a shared subscription (5.0 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// What is wrong with a topic name, filter or share name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicFault {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long, more than the {TOPIC_BYTES_MAX}-byte limit")]
    TooLong { len: usize },
    #[error("it is not valid UTF-8")]
    NotUtf8,
    #[error("it contains the character U+0000")]
    NullCharacter,
    #[error("a topic name must not contain the wildcards '+' or '#'")]
    WildcardInName,
    #[error("a wildcard ('+' or '#') must be a whole level")]
    WildcardNotWholeLevel,
    #[error("the multi-level wildcard '#' must be the last level")]
    MultiLevelWildcardNotLast,
    #[error("the share name is empty")]
    ShareNameEmpty,
    #[error("the share name contains a wildcard ('+' or '#')")]
    ShareNameWildcard,
    #[error("the share name contains '/'")]
    ShareNameSeparator,
    #[error("the share name is not followed by '/' and a topic filter")]
    SharedFilterMissing,
}

/// A topic name or filter that cannot be used, with the kind a gateway answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A PUBLISH (or will) topic name is malformed.
    #[error("invalid topic name: {0}")]
    InvalidName(TopicFault),
    /// A SUBSCRIBE or UNSUBSCRIBE topic filter (or its share name) is malformed.
    #[error("invalid topic filter: {0}")]
    InvalidFilter(TopicFault),
    /// A `$share/...` filter arrived while shared subscriptions are turned off.
    #[error("shared subscriptions are not supported")]
    SharedNotSupported,
    /// A filter with `+` or `#` arrived while wildcard subscriptions are turned off.
    #[error("wildcard subscriptions are not supported")]
    WildcardNotSupported,
}

impl TopicError {
    /// The MQTT 5.0 reason code for this error: 0x90 in a PUBACK/PUBREC or DISCONNECT for a
    /// bad topic name, 0x8F, 0x9E or 0xA2 in a SUBACK/UNSUBACK for a filter.
    pub fn reason_code(&self) -> u8 {
        match self {
            TopicError::InvalidName(_) => reason::TOPIC_NAME_INVALID,
            TopicError::InvalidFilter(_) => reason::TOPIC_FILTER_INVALID,
            TopicError::SharedNotSupported => reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
            TopicError::WildcardNotSupported => reason::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
        }
    }

    /// What is wrong, when the topic itself is malformed (not merely unsupported).
    pub fn fault(&self) -> Option<TopicFault> {
        match self {
            TopicError::InvalidName(fault) | TopicError::InvalidFilter(fault) => Some(*fault),
            TopicError::SharedNotSupported | TopicError::WildcardNotSupported => None,
        }
    }
}

/// Checks what topic names and filters share: length, emptiness and U+0000.
fn check_string(raw: &str) -> Result<(), TopicFault> {
    if raw.is_empty() {
        return Err(TopicFault::Empty);
    }
    if raw.len() > TOPIC_BYTES_MAX {
        return Err(TopicFault::TooLong { len: raw.len() });
    }
    if raw.contains('\0') {
        return Err(TopicFault::NullCharacter);
    }
    Ok(())
}

/// Checks a topic name without allocating (3.1.1 §4.7.3, 5.0 §4.7.3).
pub fn validate_topic_name(raw: &str) -> Result<(), TopicError> {
    check_string(raw).map_err(TopicError::InvalidName)?;
    if raw.contains(['+', '#']) {
        return Err(TopicError::InvalidName(TopicFault::WildcardInName));
    }
    Ok(())
}

/// Checks a topic filter without allocating (3.1.1 §4.7.1, 5.0 §4.7.1). A `$share/` filter is
/// checked as an ordinary filter here; [`SubscriptionFilter::parse`] gives it its meaning.
pub fn validate_topic_filter(raw: &str) -> Result<(), TopicError> {
    check_string(raw).map_err(TopicError::InvalidFilter)?;
    let mut levels = raw.split(LEVEL_SEPARATOR).peekable();
    while let Some(level) = levels.next() {
        if level == MULTI_LEVEL_WILDCARD {
            if levels.peek().is_some() {
                return Err(TopicError::InvalidFilter(
                    TopicFault::MultiLevelWildcardNotLast,
                ));
            }
        } else if level != SINGLE_LEVEL_WILDCARD && level.contains(['+', '#']) {
            return Err(TopicError::InvalidFilter(TopicFault::WildcardNotWholeLevel));
        }
    }
    Ok(())
}

/// Turns wire bytes into text, naming `NotUtf8` as the given kind of error.
fn utf8(raw: &[u8], wrap: fn(TopicFault) -> TopicError) -> Result<&str, TopicError> {
    std::str::from_utf8(raw).map_err(|_| wrap(TopicFault::NotUtf8))
}

/// A valid topic name: what a PUBLISH or a will is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicName(Box<str>);

impl TopicName {
    /// Validates and copies a topic name.
    pub fn new(raw: &str) -> Result<Self, TopicError> {
        validate_topic_name(raw)?;
        Ok(TopicName(raw.into()))
    }

    /// Validates a topic name received as bytes (a PUBLISH topic on the wire).
    pub fn from_bytes(raw: &[u8]) -> Result<Self, TopicError> {
        Self::new(utf8(raw, TopicError::InvalidName)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, in order; `a//b` has three, the middle one empty.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split(LEVEL_SEPARATOR)
    }

    /// The level at `index` (0-based), if the name has that many levels.
    pub fn level(&self, index: usize) -> Option<&str> {
        self.levels().nth(index)
    }

    /// True for names starting with `$` (e.g. `$SYS/...`), which wildcard-first filters skip.
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;
    fn try_from(raw: &str) -> Result<Self, TopicError> {
        Self::new(raw)
    }
}

impl TryFrom<String> for TopicName {
    type Error = TopicError;
    fn try_from(raw: String) -> Result<Self, TopicError> {
        validate_topic_name(&raw)?;
        Ok(TopicName(raw.into_boxed_str()))
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid topic filter, possibly with wildcards. A `$share/g/f` string is a valid filter too
/// (its literal meaning in 3.1.1); [`SubscriptionFilter`] is what reads it as shared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicFilter(Box<str>);

impl TopicFilter {
    /// Validates and copies a topic filter.
    pub fn new(raw: &str) -> Result<Self, TopicError> {
        validate_topic_filter(raw)?;
        Ok(TopicFilter(raw.into()))
    }

    /// Validates a topic filter received as bytes.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, TopicError> {
        Self::new(utf8(raw, TopicError::InvalidFilter)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, in order; wildcards appear as the levels `+` and `#`.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split(LEVEL_SEPARATOR)
    }

    /// How many levels the filter has (`#` counts as one).
    pub fn level_count(&self) -> usize {
        self.0.matches(LEVEL_SEPARATOR).count() + 1
    }

    /// True when the filter contains `+` or `#` (as whole levels, since it is valid).
    pub fn has_wildcards(&self) -> bool {
        self.0.contains(['+', '#'])
    }

    /// True when the first character is a wildcard, so `$` names never match (§4.7.2).
    pub fn starts_with_wildcard(&self) -> bool {
        self.0.starts_with(['+', '#'])
    }

    /// Whether a published topic name matches this filter (§4.7), including the `$` rule.
    pub fn matches(&self, name: &TopicName) -> bool {
        if name.is_dollar() && self.starts_with_wildcard() {
            return false;
        }
        let mut filter_levels = self.levels();
        let mut name_levels = name.levels();
        loop {
            match (filter_levels.next(), name_levels.next()) {
                // `#` matches the parent level too: `sport/#` matches `sport`.
                (Some(MULTI_LEVEL_WILDCARD), _) => return true,
                (Some(SINGLE_LEVEL_WILDCARD), Some(_)) => {}
                (Some(filter_level), Some(name_level)) if filter_level == name_level => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(raw: &str) -> Result<Self, TopicError> {
        Self::new(raw)
    }
}

impl AsRef<str> for TopicFilter {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which optional subscription features the server offers; unsupported ones are refused with
/// their own reason codes (0x9E, 0xA2) rather than read differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSupport {
    pub shared_subscriptions: bool,
    pub wildcard_subscriptions: bool,
}

impl FilterSupport {
    /// Everything supported: the default.
    pub const ALL: FilterSupport = FilterSupport {
        shared_subscriptions: true,
        wildcard_subscriptions: true,
    };
}

impl Default for FilterSupport {
    fn default() -> Self {
        Self::ALL
    }
}

/// A shared subscription's share name and topic filter (`$share/{ShareName}/{filter}`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedFilter {
    share_name: Box<str>,
    filter: TopicFilter,
}

impl SharedFilter {
    /// Builds a shared filter from its parts, checking the share name.
    pub fn new(share_name: &str, filter: TopicFilter) -> Result<Self, TopicError> {
        validate_share_name(share_name)?;
        // The whole `$share/{name}/{filter}` string travels as one MQTT string.
        let len = SHARE_PREFIX.len() + share_name.len() + 1 + filter.as_str().len();
        if len > TOPIC_BYTES_MAX {
            return Err(TopicError::InvalidFilter(TopicFault::TooLong { len }));
        }
        Ok(SharedFilter {
            share_name: share_name.into(),
            filter,
        })
    }

    pub fn share_name(&self) -> &str {
        &self.share_name
    }

    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }
}

impl fmt::Display for SharedFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SHARE_PREFIX}{}/{}", self.share_name, self.filter)
    }
}

/// Checks a share name: at least one character, no `/`, `+` or `#` (5.0 §4.8.2).
fn validate_share_name(share_name: &str) -> Result<(), TopicError> {
    if share_name.is_empty() {
        return Err(TopicError::InvalidFilter(TopicFault::ShareNameEmpty));
    }
    if share_name.contains(['+', '#']) {
        return Err(TopicError::InvalidFilter(TopicFault::ShareNameWildcard));
    }
    if share_name.contains(LEVEL_SEPARATOR) {
        return Err(TopicError::InvalidFilter(TopicFault::ShareNameSeparator));
    }
    check_string(share_name).map_err(TopicError::InvalidFilter)
}

/// The filter of one SUBSCRIBE or UNSUBSCRIBE entry: ordinary or shared. Two subscriptions of
/// one client are the same exactly when their `SubscriptionFilter`s are equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubscriptionFilter {
    Plain(TopicFilter),
    Shared(SharedFilter),
}

impl SubscriptionFilter {
    /// Reads a filter as it arrives in a SUBSCRIBE, with `$share/` meaning a shared
    /// subscription. When `support` turns shared subscriptions off, a `$share/` filter is
    /// refused with [`TopicError::SharedNotSupported`] as 5.0 requires, not read literally.
    pub fn parse(raw: &str, support: FilterSupport) -> Result<Self, TopicError> {
        let parsed = match raw.strip_prefix(SHARE_PREFIX) {
            Some(rest) => {
                // The whole string still obeys the filter rules (length, U+0000).
                check_string(raw).map_err(TopicError::InvalidFilter)?;
                let Some((share_name, filter)) = rest.split_once(LEVEL_SEPARATOR) else {
                    if rest.is_empty() {
                        return Err(TopicError::InvalidFilter(TopicFault::ShareNameEmpty));
                    }
                    return Err(TopicError::InvalidFilter(TopicFault::SharedFilterMissing));
                };
                validate_share_name(share_name)?;
                if filter.is_empty() {
                    return Err(TopicError::InvalidFilter(TopicFault::SharedFilterMissing));
                }
                let filter = TopicFilter::new(filter)?;
                if !support.shared_subscriptions {
                    return Err(TopicError::SharedNotSupported);
                }
                SubscriptionFilter::Shared(SharedFilter {
                    share_name: share_name.into(),
                    filter,
                })
            }
            None => SubscriptionFilter::Plain(TopicFilter::new(raw)?),
        };
        if !support.wildcard_subscriptions && parsed.topic_filter().has_wildcards() {
            return Err(TopicError::WildcardNotSupported);
        }
        Ok(parsed)
    }

    /// The topic filter that names are matched against (without any `$share/` prefix).
    pub fn topic_filter(&self) -> &TopicFilter {
        match self {
            SubscriptionFilter::Plain(filter) => filter,
            SubscriptionFilter::Shared(shared) => &shared.filter,
        }
    }

    /// The share name, for a shared subscription.
    pub fn share_name(&self) -> Option<&str> {
        match self {
            SubscriptionFilter::Plain(_) => None,
            SubscriptionFilter::Shared(shared) => Some(&shared.share_name),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, SubscriptionFilter::Shared(_))
    }

    /// Whether a published topic name matches (§4.7; a shared filter matches like its filter).
    pub fn matches(&self, name: &TopicName) -> bool {
        self.topic_filter().matches(name)
    }
}

impl From<TopicFilter> for SubscriptionFilter {
    fn from(filter: TopicFilter) -> Self {
        SubscriptionFilter::Plain(filter)
    }
}

impl From<SharedFilter> for SubscriptionFilter {
    fn from(shared: SharedFilter) -> Self {
        SubscriptionFilter::Shared(shared)
    }
}

impl fmt::Display for SubscriptionFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscriptionFilter::Plain(filter) => filter.fmt(f),
            SubscriptionFilter::Shared(shared) => shared.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> TopicName {
        TopicName::new(raw).unwrap()
    }

    fn filter(raw: &str) -> TopicFilter {
        TopicFilter::new(raw).unwrap()
    }

    fn name_fault(raw: &str) -> TopicFault {
        match TopicName::new(raw) {
            Err(TopicError::InvalidName(fault)) => fault,
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    fn filter_fault(raw: &str) -> TopicFault {
        match TopicFilter::new(raw) {
            Err(TopicError::InvalidFilter(fault)) => fault,
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    #[test]
    fn names_reject_what_the_spec_forbids() {
        assert_eq!(name_fault(""), TopicFault::Empty);
        assert_eq!(name_fault("a/+"), TopicFault::WildcardInName);
        assert_eq!(name_fault("a/#"), TopicFault::WildcardInName);
        assert_eq!(name_fault("a+b"), TopicFault::WildcardInName);
        assert_eq!(name_fault("a\0b"), TopicFault::NullCharacter);
        let long = "a".repeat(TOPIC_BYTES_MAX + 1);
        assert_eq!(
            name_fault(&long),
            TopicFault::TooLong {
                len: TOPIC_BYTES_MAX + 1
            }
        );
        assert!(TopicName::new(&long[..TOPIC_BYTES_MAX]).is_ok());
        assert_eq!(
            TopicName::from_bytes(b"a/\xff"),
            Err(TopicError::InvalidName(TopicFault::NotUtf8))
        );
    }

    #[test]
    fn names_accept_empty_levels_spaces_and_dollars() {
        for raw in [
            "/",
            "//",
            "a//b",
            "/a",
            "a/",
            " ",
            "$SYS/x",
            "ünï/cödé",
            "$share/g/x",
        ] {
            assert_eq!(name(raw).as_str(), raw);
        }
        assert_eq!(name("a//b").levels().collect::<Vec<_>>(), ["a", "", "b"]);
        assert_eq!(name("/a").level(0), Some(""));
        assert_eq!(name("/a").level(2), None);
    }

    #[test]
    fn filters_follow_the_wildcard_rules() {
        for raw in [
            "#",
            "+",
            "+/+",
            "/+",
            "+/",
            "sport/#",
            "sport/+/player1",
            "a//#",
            "$SYS/#",
        ] {
            assert_eq!(filter(raw).as_str(), raw);
        }
        assert_eq!(filter_fault(""), TopicFault::Empty);
        assert_eq!(
            filter_fault("sport/tennis#"),
            TopicFault::WildcardNotWholeLevel
        );
        assert_eq!(filter_fault("sport+"), TopicFault::WildcardNotWholeLevel);
        assert_eq!(
            filter_fault("sport/#/ranking"),
            TopicFault::MultiLevelWildcardNotLast
        );
        assert_eq!(filter_fault("#/"), TopicFault::MultiLevelWildcardNotLast);
        assert_eq!(filter_fault("a\0"), TopicFault::NullCharacter);
    }

    #[test]
    fn matching_follows_levels_and_wildcards() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            ("sport/#", "sport", true),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
        ];
        for (raw_filter, raw_name, expected) in cases {
            assert_eq!(
                filter(raw_filter).matches(&name(raw_name)),
                expected,
                "{raw_filter} vs {raw_name}"
            );
        }
    }

    #[test]
    fn shared_filters_parse_into_group_and_filter() {
        let parsed = SubscriptionFilter::parse("$share/g1/a/+/#", FilterSupport::ALL).unwrap();
        assert_eq!(parsed.share_name(), Some("g1"));
        assert_eq!(parsed.topic_filter().as_str(), "a/+/#");
        assert_eq!(parsed.to_string(), "$share/g1/a/+/#");
        let fault = |raw| SubscriptionFilter::parse(raw, FilterSupport::ALL).unwrap_err();
        assert_eq!(
            fault("$share//a"),
            TopicError::InvalidFilter(TopicFault::ShareNameEmpty)
        );
        assert_eq!(
            fault("$share/"),
            TopicError::InvalidFilter(TopicFault::ShareNameEmpty)
        );
        assert_eq!(
            fault("$share/g"),
            TopicError::InvalidFilter(TopicFault::SharedFilterMissing)
        );
        assert_eq!(
            fault("$share/g/"),
            TopicError::InvalidFilter(TopicFault::SharedFilterMissing)
        );
        assert_eq!(
            fault("$share/g+/a"),
            TopicError::InvalidFilter(TopicFault::ShareNameWildcard)
        );
        assert_eq!(
            fault("$share/#/a"),
            TopicError::InvalidFilter(TopicFault::ShareNameWildcard)
        );
        assert_eq!(
            fault("$share/g/a/#/b"),
            TopicError::InvalidFilter(TopicFault::MultiLevelWildcardNotLast)
        );
        // Without the trailing slash `$share` is an ordinary first level.
        assert!(
            !SubscriptionFilter::parse("$share", FilterSupport::ALL)
                .unwrap()
                .is_shared()
        );
    }

    #[test]
    fn unsupported_features_get_their_own_reason_codes() {
        let no_shared = FilterSupport {
            shared_subscriptions: false,
            ..FilterSupport::ALL
        };
        let err = SubscriptionFilter::parse("$share/g/a", no_shared).unwrap_err();
        assert_eq!(err, TopicError::SharedNotSupported);
        assert_eq!(err.reason_code(), 0x9E);
        let no_wildcards = FilterSupport {
            wildcard_subscriptions: false,
            ..FilterSupport::ALL
        };
        let err = SubscriptionFilter::parse("a/+", no_wildcards).unwrap_err();
        assert_eq!(err.reason_code(), 0xA2);
        assert!(SubscriptionFilter::parse("a/b", no_wildcards).is_ok());
        assert_eq!(TopicName::new("#").unwrap_err().reason_code(), 0x90);
        assert_eq!(TopicFilter::new("a#").unwrap_err().reason_code(), 0x8F);
    }
}
