//! Ingest routes: the log topic and record key each accepted PUBLISH is appended under, from an
//! ordered list of MQTT topic filters with key templates compiled once at config time.
//!
//! The first route whose filter matches the topic name wins; when none does, the default route
//! applies: log topic [`DEFAULT_LOG_TOPIC`] keyed by the MQTT topic name. Filters match as
//! subscriptions do, `$` rule included, so `#` does not route `$SYS/...` (such names take the
//! default route unless a route names them, e.g. `$SYS/#`).
//!
//! A key template is literal text with placeholders: `{topic}` (the whole topic name),
//! `{client_id}` (the publisher), `{level:N}` (level N of the topic name, 0-based, empty when
//! the name is shorter), and `{{` / `}}` for literal braces. Rendering computes the exact
//! length first, so it allocates once, exactly the output.

use std::fmt;

use silt_log::{LogError, validate_topic_name};

use super::topic::{TOPIC_BYTES_MAX, TopicError, TopicFilter, TopicName};

/// The log topic of the default route.
pub const DEFAULT_LOG_TOPIC: &str = "mqtt";

/// The key template of the default route: the MQTT topic name.
pub const DEFAULT_KEY_TEMPLATE: &str = "{topic}";

/// Most routes a table may hold; resolving is a scan in order, so this bounds its cost.
pub const ROUTES_MAX: usize = 1_024;

/// Longest key template source text.
pub const KEY_TEMPLATE_BYTES_MAX: usize = 1_024;

/// Most placeholders in one key template, which bounds a key to that many topic names.
pub const KEY_TEMPLATE_PLACEHOLDERS_MAX: usize = 16;

/// Highest `{level:N}`: a topic name of [`TOPIC_BYTES_MAX`] bytes has at most this + 1 levels.
pub const KEY_TEMPLATE_LEVEL_MAX: usize = TOPIC_BYTES_MAX / 2;

/// One route as configured, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// An MQTT topic filter, e.g. `sensors/+/temperature`.
    pub filter: String,
    /// The log topic, valid by Kafka's topic-name rules.
    pub log_topic: String,
    /// A key template, e.g. `{level:1}`.
    pub key: String,
}

/// What is wrong with a key template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the '{{' at byte {position} is not closed by '}}'")]
    Unclosed { position: usize },
    #[error("the '}}' at byte {position} has no '{{' before it (write '}}}}' for a literal '}}')")]
    UnmatchedClose { position: usize },
    #[error("unknown placeholder {{{name}}}: use {{topic}}, {{client_id}} or {{level:N}}")]
    UnknownPlaceholder { name: String },
    #[error("the level in {{{placeholder}}} must be a number from 0 to {KEY_TEMPLATE_LEVEL_MAX}")]
    BadLevel { placeholder: String },
    #[error("the template is {len} bytes long, more than the limit of {KEY_TEMPLATE_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("the template has more than {KEY_TEMPLATE_PLACEHOLDERS_MAX} placeholders")]
    TooManyPlaceholders,
}

/// A route that cannot be used; `index` is the route's 0-based position in the config list.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {index}: invalid filter {filter:?}: {source}")]
    Filter {
        index: usize,
        filter: String,
        #[source]
        source: TopicError,
    },
    #[error("route {index}: invalid log topic: {source}")]
    LogTopic {
        index: usize,
        #[source]
        source: LogError,
    },
    #[error("route {index}: invalid key template {template:?}: {source}")]
    KeyTemplate {
        index: usize,
        template: String,
        #[source]
        source: TemplateError,
    },
    #[error("{count} routes are configured, more than the limit of {ROUTES_MAX}")]
    TooMany { count: usize },
}

/// One piece of a compiled key template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    Topic,
    ClientId,
    Level(usize),
}

/// A compiled key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: Box<str>,
    parts: Box<[Part]>,
}

impl KeyTemplate {
    /// Compiles a template; adjacent literal text becomes one part.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.len() > KEY_TEMPLATE_BYTES_MAX {
            return Err(TemplateError::TooLong {
                len: template.len(),
            });
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(brace_at) = rest.find(['{', '}']) {
            let position = template.len() - rest.len() + brace_at;
            literal.push_str(&rest[..brace_at]);
            let (brace, after) = rest[brace_at..].split_at(1);
            if after.starts_with(brace) {
                literal.push_str(brace);
                rest = &after[1..];
                continue;
            }
            if brace == "}" {
                return Err(TemplateError::UnmatchedClose { position });
            }
            let Some((placeholder, after_close)) = after.split_once('}') else {
                return Err(TemplateError::Unclosed { position });
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal).into()));
            }
            parts.push(Self::placeholder(placeholder)?);
            rest = after_close;
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        let placeholders = parts
            .iter()
            .filter(|part| !matches!(part, Part::Literal(_)))
            .count();
        if placeholders > KEY_TEMPLATE_PLACEHOLDERS_MAX {
            return Err(TemplateError::TooManyPlaceholders);
        }
        Ok(KeyTemplate {
            source: template.into(),
            parts: parts.into(),
        })
    }

    fn placeholder(placeholder: &str) -> Result<Part, TemplateError> {
        match placeholder {
            "topic" => Ok(Part::Topic),
            "client_id" => Ok(Part::ClientId),
            _ => {
                let Some(digits) = placeholder.strip_prefix("level:") else {
                    return Err(TemplateError::UnknownPlaceholder {
                        name: placeholder.to_string(),
                    });
                };
                let bad_level = || TemplateError::BadLevel {
                    placeholder: placeholder.to_string(),
                };
                // Digits only: `usize::from_str` would also take a leading `+`.
                if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                    return Err(bad_level());
                }
                match digits.parse::<usize>() {
                    Ok(level) if level <= KEY_TEMPLATE_LEVEL_MAX => Ok(Part::Level(level)),
                    _ => Err(bad_level()),
                }
            }
        }
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn part<'a>(part: &'a Part, topic: &'a TopicName, client_id: &'a str) -> &'a str {
        match part {
            Part::Literal(text) => text,
            Part::Topic => topic.as_str(),
            Part::ClientId => client_id,
            Part::Level(index) => topic.level(*index).unwrap_or(""),
        }
    }

    /// The exact byte length of the rendered key.
    pub fn rendered_len(&self, topic: &TopicName, client_id: &str) -> usize {
        self.parts
            .iter()
            .map(|part| Self::part(part, topic, client_id).len())
            .sum()
    }

    /// Appends the rendered key to `out`, growing it at most once.
    pub fn render_into(&self, topic: &TopicName, client_id: &str, out: &mut String) {
        out.reserve(self.rendered_len(topic, client_id));
        for part in &self.parts {
            out.push_str(Self::part(part, topic, client_id));
        }
    }

    /// The rendered key, in one allocation of exactly its length.
    pub fn render(&self, topic: &TopicName, client_id: &str) -> String {
        let mut out = String::with_capacity(self.rendered_len(topic, client_id));
        for part in &self.parts {
            out.push_str(Self::part(part, topic, client_id));
        }
        out
    }

    /// The default route's template, `{topic}`.
    fn topic_name() -> Self {
        KeyTemplate {
            source: DEFAULT_KEY_TEMPLATE.into(),
            parts: Box::new([Part::Topic]),
        }
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None` for the default route, which matches every name.
    filter: Option<TopicFilter>,
    log_topic: Box<str>,
    key: KeyTemplate,
}

impl Route {
    pub fn filter(&self) -> Option<&TopicFilter> {
        self.filter.as_ref()
    }

    pub fn log_topic(&self) -> &str {
        &self.log_topic
    }

    pub fn key(&self) -> &KeyTemplate {
        &self.key
    }

    /// The record key for a message on `topic` from `client_id`.
    pub fn render_key(&self, topic: &TopicName, client_id: &str) -> String {
        self.key.render(topic, client_id)
    }

    fn default_route() -> Self {
        Route {
            filter: None,
            log_topic: DEFAULT_LOG_TOPIC.into(),
            key: KeyTemplate::topic_name(),
        }
    }
}

/// The configured routes in order, and the default route behind them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
    default: Route,
}

impl Default for RouteTable {
    /// No configured routes: everything goes to the default route.
    fn default() -> Self {
        RouteTable {
            routes: Vec::new(),
            default: Route::default_route(),
        }
    }
}

impl RouteTable {
    /// Validates and compiles the configured routes, keeping their order.
    pub fn new(specs: &[RouteSpec]) -> Result<Self, RouteError> {
        if specs.len() > ROUTES_MAX {
            return Err(RouteError::TooMany { count: specs.len() });
        }
        let routes = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| Self::compile(index, spec))
            .collect::<Result<_, _>>()?;
        Ok(RouteTable {
            routes,
            ..RouteTable::default()
        })
    }

    fn compile(index: usize, spec: &RouteSpec) -> Result<Route, RouteError> {
        let filter = TopicFilter::new(&spec.filter).map_err(|source| RouteError::Filter {
            index,
            filter: spec.filter.clone(),
            source,
        })?;
        validate_topic_name(&spec.log_topic)
            .map_err(|source| RouteError::LogTopic { index, source })?;
        let key = KeyTemplate::parse(&spec.key).map_err(|source| RouteError::KeyTemplate {
            index,
            template: spec.key.clone(),
            source,
        })?;
        Ok(Route {
            filter: Some(filter),
            log_topic: spec.log_topic.as_str().into(),
            key,
        })
    }

    /// The route for a topic name: the first configured route whose filter matches, else the
    /// default route.
    pub fn resolve(&self, topic: &TopicName) -> &Route {
        self.routes
            .iter()
            .find(|route| route.filter.as_ref().is_some_and(|f| f.matches(topic)))
            .unwrap_or(&self.default)
    }

    /// The configured routes, in order (the default route is not among them).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn default_route(&self) -> &Route {
        &self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> TopicName {
        TopicName::new(raw).unwrap()
    }

    fn render(template: &str, topic: &str, client_id: &str) -> String {
        KeyTemplate::parse(template)
            .unwrap()
            .render(&name(topic), client_id)
    }

    #[test]
    fn templates_render_placeholders_and_literals() {
        assert_eq!(render("{topic}", "a/b", "c1"), "a/b");
        assert_eq!(render("{client_id}", "a/b", "c1"), "c1");
        assert_eq!(render("{level:0}-{level:1}", "a/b", "c1"), "a-b");
        assert_eq!(render("{level:2}", "a/b", "c1"), "");
        assert_eq!(render("{level:0}", "/b", "c1"), "");
        assert_eq!(
            render("dev:{client_id}/{level:1}!", "x/y", "c1"),
            "dev:c1/y!"
        );
        assert_eq!(render("{{literal}} {{{topic}}}", "t", "c"), "{literal} {t}");
        assert_eq!(render("", "t", "c"), "");
        assert_eq!(render("plain", "t", "c"), "plain");
    }

    #[test]
    fn rendering_allocates_exactly_the_output() {
        let template = KeyTemplate::parse("k/{level:1}/{client_id}/{level:9}").unwrap();
        let topic = name("site/pump-7/temp");
        let key = template.render(&topic, "edge-1");
        assert_eq!(key, "k/pump-7/edge-1/");
        assert_eq!(key.capacity(), key.len());
        assert_eq!(template.rendered_len(&topic, "edge-1"), key.len());
        let mut out = String::from("prefix:");
        template.render_into(&topic, "edge-1", &mut out);
        assert_eq!(out, "prefix:k/pump-7/edge-1/");
    }

    #[test]
    fn malformed_templates_are_config_errors() {
        let err = |template: &str| KeyTemplate::parse(template).unwrap_err();
        assert_eq!(err("a{topic"), TemplateError::Unclosed { position: 1 });
        assert_eq!(err("a}b"), TemplateError::UnmatchedClose { position: 1 });
        assert_eq!(
            err("{topic}}"),
            TemplateError::UnmatchedClose { position: 7 }
        );
        assert!(matches!(
            err("{nope}"),
            TemplateError::UnknownPlaceholder { .. }
        ));
        assert!(matches!(
            err("{}"),
            TemplateError::UnknownPlaceholder { .. }
        ));
        assert!(matches!(
            err("{Topic}"),
            TemplateError::UnknownPlaceholder { .. }
        ));
        for bad in [
            "{level:}",
            "{level:x}",
            "{level:-1}",
            "{level:+1}",
            "{level: 1}",
        ] {
            assert!(matches!(err(bad), TemplateError::BadLevel { .. }), "{bad}");
        }
        assert!(matches!(
            err("{level:32768}"),
            TemplateError::BadLevel { .. }
        ));
        assert!(matches!(
            err("{level:99999999999999999999999}"),
            TemplateError::BadLevel { .. }
        ));
        assert!(KeyTemplate::parse("{level:32767}").is_ok());
        assert_eq!(
            err(&"{topic}".repeat(17)),
            TemplateError::TooManyPlaceholders
        );
        assert!(KeyTemplate::parse(&"{topic}".repeat(16)).is_ok());
        assert!(matches!(
            err(&"x".repeat(1025)),
            TemplateError::TooLong { len: 1025 }
        ));
    }

    #[test]
    fn default_route_is_mqtt_keyed_by_topic() {
        let table = RouteTable::default();
        let route = table.resolve(&name("a/b"));
        assert_eq!(route.log_topic(), "mqtt");
        assert_eq!(route.filter(), None);
        assert_eq!(route.render_key(&name("a/b"), "c"), "a/b");
        assert_eq!(
            table.default_route().key(),
            &KeyTemplate::parse(DEFAULT_KEY_TEMPLATE).unwrap()
        );
    }

    #[test]
    fn invalid_routes_name_their_index() {
        let spec = |filter: &str, log_topic: &str, key: &str| RouteSpec {
            filter: filter.into(),
            log_topic: log_topic.into(),
            key: key.into(),
        };
        let good = spec("a/#", "a", "{topic}");
        let err = RouteTable::new(&[good.clone(), spec("a/#/b", "a", "")]).unwrap_err();
        assert!(matches!(err, RouteError::Filter { index: 1, .. }), "{err}");
        let err = RouteTable::new(&[good.clone(), spec("a", "bad topic", "")]).unwrap_err();
        assert!(
            matches!(err, RouteError::LogTopic { index: 1, .. }),
            "{err}"
        );
        let err = RouteTable::new(&[spec("a", "a", "{x}"), good.clone()]).unwrap_err();
        assert!(
            matches!(err, RouteError::KeyTemplate { index: 0, .. }),
            "{err}"
        );
        let too_many = vec![good; ROUTES_MAX + 1];
        let err = RouteTable::new(&too_many).unwrap_err();
        assert!(matches!(err, RouteError::TooMany { .. }), "{err}");
    }
}
