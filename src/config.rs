//! The serde configuration, in the Higress `ai-token-ratelimit` vocabulary, and its validation.
//!
//! ```
//! use tower_token_ratelimit::{TokenRateLimitConfig, TokenRateLimitLayer};
//!
//! let cfg: TokenRateLimitConfig = serde_json::from_str(r#"{
//!     "rule_name": "llm",
//!     "rule_items": [{
//!         "limit_by_per_header": "x-api-key",
//!         "limit_keys": [{"key": "*", "token_per_minute": 100000, "token_per_day": 2000000}]
//!     }]
//! }"#).unwrap();
//! let layer = TokenRateLimitLayer::from_config(cfg).unwrap();
//! # let _ = layer;
//! ```
//!
//! Validation reports every problem at once, each with its path and how to fix it:
//!
//! ```
//! # use tower_token_ratelimit::{TokenRateLimitConfig, TokenRateLimitLayer};
//! let cfg: TokenRateLimitConfig = serde_json::from_str(r#"{
//!     "rule_name": "llm",
//!     "rule_items": [{"limit_by_per_header": "x-user", "limit_keys": [{"key": "alice", "token_per_minute": 0}]}]
//! }"#).unwrap();
//! let err = TokenRateLimitLayer::from_config(cfg).unwrap_err();
//! assert_eq!(err.problems().len(), 2);
//! assert!(err.to_string().contains("rule_items[0].limit_keys[0].token_per_minute: must be > 0"));
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderName, StatusCode};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::cost::{Cost, CostConfig};
use crate::error::{ConfigError, Problems};
use crate::key::{IpSource, KeyExtractor, KeySource};
use crate::rule::{Entry, Item, Limit, MSE_CONSUMER, Matcher, Rules};
use crate::store::Algorithm;

/// The default `key_prefix`, Higress's.
pub const DEFAULT_KEY_PREFIX: &str = "higress-token-ratelimit";

/// A block given with no value (`null`, as YAML reads a key whose lines are all commented
/// out) is an empty block, reported by validation, rather than an absent one.
fn null_is_empty<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(|v| Some(v.unwrap_or_default()))
}

/// Headers whose values are always treated as secrets (hashed in keys, never logged), as a
/// `limit_by_header` / `limit_by_per_header` source or a composite's `header:<name>` part:
/// credentials (`authorization`, `proxy-authorization`) and the providers' API-key headers
/// (`x-api-key`: Anthropic and others; `api-key`: Azure OpenAI; `x-goog-api-key`: Gemini).
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
];

fn is_secret_header(name: &HeaderName) -> bool {
    SECRET_HEADERS.contains(&name.as_str())
}

/// Largest compiled size of one `regexp:` key; bigger patterns are a configuration error.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The whole configuration: a Higress `ai-token-ratelimit` plugin config plus this crate's
/// extensions. Deserialise it from YAML or JSON and pass it to
/// [`TokenRateLimitLayer::from_config`](crate::TokenRateLimitLayer::from_config).
///
/// Unknown fields are kept and reported as errors by validation (with every other problem),
/// rather than silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct TokenRateLimitConfig {
    /// Names this set of limits; part of every counter key (required).
    #[serde(default)]
    pub rule_name: String,
    /// One limit on every request together. Given empty (YAML `global_threshold:` with its
    /// lines commented out) it is an error, not the absence of a global limit.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub global_threshold: Option<ThresholdConfig>,
    /// Limits per key source; all matching items apply.
    #[serde(default)]
    pub rule_items: Vec<RuleItemConfig>,
    /// Status of a rejection (default 429; 400–599).
    #[serde(default)]
    pub rejected_code: Option<u16>,
    /// Body of a rejection, sent as is (default: an OpenAI-style JSON error).
    #[serde(default)]
    pub rejected_msg: Option<String>,
    /// A request header trusted to carry the consumer name (e.g. `x-mse-consumer`). Without it,
    /// the consumer comes only from the [`Consumer`](crate::Consumer) request extension.
    #[serde(default)]
    pub consumer_header: Option<String>,
    /// IPs / CIDR ranges of proxies whose `X-Forwarded-For` entries are skipped from the right.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Prefix of every counter key (default `higress-token-ratelimit`).
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Which rate limit headers go on admitted responses.
    #[serde(default)]
    pub response_headers: Option<ResponseHeadersConfig>,
    /// Where counters live: absent → the in-memory store; present → Redis (standalone or
    /// Cluster). Given empty (YAML `redis:` with its lines commented out) it is an error, not
    /// the in-memory store.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub redis: Option<RedisConfig>,
    /// What to do when the store cannot answer (default `open`).
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// How reported usage becomes the tokens debited (default: every token reported).
    #[serde(default)]
    pub cost: Option<CostConfig>,
    /// Ask OpenAI-style upstreams for usage on streaming chat / completions requests that did
    /// not (`stream_options.include_usage`), and remove the extra chunk from what the client
    /// receives (default true).
    #[serde(default)]
    pub inject_include_usage: Option<bool>,
    /// Largest request body read for that, in bytes (default 1 MiB); a larger body is passed
    /// on untouched and its usage, if the upstream reports none, estimated.
    #[serde(default)]
    pub request_body_limit: Option<usize>,
    /// `post_debit` (default, Higress) or `reserve`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// In `reserve` mode, the output allowance of a request without `max_tokens` until one is
    /// learned from actual usage (default 1024).
    #[serde(default)]
    pub default_output_tokens: Option<u64>,
    /// Distinct `model` label values of the tokens metric (default 64); past them, `other`.
    /// The metrics registry is the process's, so this is too: the last layer built or
    /// reloaded sets it.
    #[serde(default)]
    pub metrics_max_models: Option<usize>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

/// `global_threshold`: windows for one limit (every one set applies).
#[derive(Debug, Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct ThresholdConfig {
    /// Tokens per second.
    #[serde(default)]
    pub token_per_second: Option<u64>,
    /// Tokens per minute.
    #[serde(default)]
    pub token_per_minute: Option<u64>,
    /// Tokens per hour.
    #[serde(default)]
    pub token_per_hour: Option<u64>,
    /// Tokens per day.
    #[serde(default)]
    pub token_per_day: Option<u64>,
    /// `fixed_window` (default), `sliding_window` or `token_bucket`.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

/// One `rule_items` entry: exactly one `limit_by_*` source and its `limit_keys`.
#[derive(Debug, Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct RuleItemConfig {
    /// Header name; one shared counter per listed value.
    #[serde(default)]
    pub limit_by_header: Option<String>,
    /// Query parameter name; one shared counter per listed value.
    #[serde(default)]
    pub limit_by_param: Option<String>,
    /// Cookie name; one shared counter per listed value.
    #[serde(default)]
    pub limit_by_cookie: Option<String>,
    /// Present (any value, e.g. `''`): one shared counter per listed consumer.
    #[serde(default, deserialize_with = "present")]
    pub limit_by_consumer: Option<serde_json::Value>,
    /// Header name; one counter per distinct value.
    #[serde(default)]
    pub limit_by_per_header: Option<String>,
    /// Query parameter name; one counter per distinct value.
    #[serde(default)]
    pub limit_by_per_param: Option<String>,
    /// Cookie name; one counter per distinct value.
    #[serde(default)]
    pub limit_by_per_cookie: Option<String>,
    /// Present (any value): one counter per consumer.
    #[serde(default, deserialize_with = "present")]
    pub limit_by_per_consumer: Option<serde_json::Value>,
    /// `from-remote-addr` or `from-header-<name>`: one counter per client IP.
    #[serde(default)]
    pub limit_by_per_ip: Option<String>,
    /// Present (any value): one shared counter per listed model (the request's JSON `model`,
    /// or Gemini's `/models/{model}:` path).
    #[serde(default, deserialize_with = "present")]
    pub limit_by_model: Option<serde_json::Value>,
    /// Present (any value): one counter per model.
    #[serde(default, deserialize_with = "present")]
    pub limit_by_per_model: Option<serde_json::Value>,
    /// One counter per combination of several sources, e.g. `[consumer, model]`; parts are
    /// `consumer`, `model`, `ip` (the TCP peer), `header:<name>`, `param:<name>`,
    /// `cookie:<name>`. The value matched by `limit_keys` is the parts joined with `|`
    /// (`alice|gpt-4o`). It is hashed in counter keys when a part is a secret header (as
    /// [`secret`](Self::secret) lists) or not UTF-8.
    #[serde(default)]
    pub limit_by_composite: Option<Vec<String>>,
    /// The item applies only to these request paths: exact, or a prefix ending in `*`. An
    /// item with `paths` or `methods` counts in counters of its own (its key name gets `@` and
    /// a hash of the conditions).
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    /// The item applies only to these methods (`POST`, ...).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Treat the values as secrets: hashed in keys, never logged (always on for the
    /// `authorization`, `proxy-authorization`, `x-api-key`, `api-key` and `x-goog-api-key`
    /// headers, and for a composite with one of them as a part; `false` does not turn it off).
    #[serde(default)]
    pub secret: Option<bool>,
    /// Key entries, tried in order; the first that matches the request's value applies.
    #[serde(default)]
    pub limit_keys: Vec<LimitKeyConfig>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

/// One `limit_keys` entry: a key pattern and its windows (every one set applies).
#[derive(Debug, Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct LimitKeyConfig {
    /// An exact value; or, for `per_` sources, `*` (any value) or `regexp:<re>` (anchored);
    /// or, for `limit_by_per_ip`, an IP, a CIDR range, or `*`.
    #[serde(default)]
    pub key: String,
    /// Tokens per second.
    #[serde(default)]
    pub token_per_second: Option<u64>,
    /// Tokens per minute.
    #[serde(default)]
    pub token_per_minute: Option<u64>,
    /// Tokens per hour.
    #[serde(default)]
    pub token_per_hour: Option<u64>,
    /// Tokens per day.
    #[serde(default)]
    pub token_per_day: Option<u64>,
    /// `fixed_window` (default), `sliding_window` or `token_bucket`.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

impl LimitKeyConfig {
    /// An entry for this key with no window yet.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ..Default::default()
        }
    }
}

/// When a request's tokens are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Admit while every counter has budget left; add the actual usage when the response ends
    /// (Higress). Concurrent requests can overshoot the budget together.
    #[default]
    PostDebit,
    /// At admission, reserve an estimate on every counter, all or none (prompt estimate plus
    /// `max_tokens`, or an allowance learned from recent responses); at the end, correct it to
    /// the actual usage. Overshoot is bounded by the estimate's error, not by concurrency.
    Reserve,
}

/// What the layer does when its store cannot answer (Redis down, timed out, breaker open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Admit the request (Higress's behaviour). Its debit is kept and written when the store is
    /// back.
    #[default]
    Open,
    /// Reject with 503 and a JSON body saying the limiter's store is unavailable (gRPC:
    /// `UNAVAILABLE`).
    Closed,
    /// Decide with an in-memory store in this process, which every settlement also feeds, so
    /// limits still hold per replica.
    Local,
}

/// The `redis:` block: Higress's fields, or `url`, or `cluster_nodes` (exactly one of
/// `service_name`, `url`, `cluster_nodes`).
#[derive(Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Host name of the Redis service.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Port (default 6379).
    #[serde(default)]
    pub service_port: Option<u16>,
    /// ACL user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Per-call timeout in milliseconds (default 50).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Database number (default 0; standalone only).
    #[serde(default)]
    pub database: Option<i64>,
    /// `redis://[user[:password]@]host[:port][/db]`.
    #[serde(default)]
    pub url: Option<String>,
    /// Redis Cluster nodes, `host:port` each.
    #[serde(default)]
    pub cluster_nodes: Option<Vec<String>>,
    /// How long, in milliseconds, a check's answer is reused by later checks of the same
    /// counters, this replica's own debits added (default 10; 0: every check asks Redis).
    /// Not in Higress.
    #[serde(default)]
    pub check_reuse: Option<u64>,
    /// The shortest time, in milliseconds, between two writes of settlements (default 5, at
    /// most 60000; 0: each write as soon as the one before has ended). Not in Higress.
    #[serde(default)]
    pub settle_interval: Option<u64>,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("service_name", &self.service_name)
            .field("service_port", &self.service_port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("database", &self.database)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("cluster_nodes", &self.cluster_nodes)
            .field("check_reuse", &self.check_reuse)
            .field("settle_interval", &self.settle_interval)
            .finish()
    }
}

impl RedisConfig {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn check_unknown(&self, p: &mut Problems) {
        unknown_fields(
            p,
            "redis",
            &self.unknown,
            "service_name, service_port, username, password, timeout, database, url, cluster_nodes, \
             check_reuse, settle_interval",
        );
    }
}

/// `response_headers`: which rate limit headers admitted responses carry.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct ResponseHeadersConfig {
    /// `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens`, `x-ratelimit-reset-tokens`
    /// for the tightest matched limit (default on).
    #[serde(default = "yes")]
    pub openai: bool,
    /// `RateLimit-Policy` and `RateLimit` (IETF draft-ietf-httpapi-ratelimit-headers) for the
    /// tightest matched limit (default off).
    #[serde(default)]
    pub ietf: bool,
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for ResponseHeadersConfig {
    fn default() -> Self {
        Self {
            openai: true,
            ietf: false,
            unknown: BTreeMap::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// `Some` whenever the field is present, even as `null` or `''` (Higress only checks presence).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A rule item whose key comes from user code (from the builder only).
#[derive(Clone)]
pub(crate) struct CustomSource {
    pub(crate) name: String,
    pub(crate) extractor: Arc<dyn KeyExtractor>,
}

/// A validated configuration.
#[derive(Clone)]
pub(crate) struct Compiled {
    pub(crate) rules: Rules,
    pub(crate) rejected_code: StatusCode,
    pub(crate) rejected_msg: Option<Arc<str>>,
    pub(crate) openai_headers: bool,
    pub(crate) ietf_headers: bool,
    pub(crate) failure_mode: FailureMode,
    pub(crate) cost: Cost,
    pub(crate) inject_include_usage: bool,
    pub(crate) request_body_limit: usize,
    pub(crate) mode: Mode,
    pub(crate) default_output_tokens: u64,
    pub(crate) metrics_max_models: usize,
}

const SOURCES: &str = "limit_by_header, limit_by_param, limit_by_cookie, limit_by_consumer, \
     limit_by_per_header, limit_by_per_param, limit_by_per_cookie, limit_by_per_consumer, \
     limit_by_per_ip, limit_by_model, limit_by_per_model, limit_by_composite";
const WINDOWS: &str = "token_per_second, token_per_minute, token_per_hour, token_per_day";

fn unknown_fields(
    p: &mut Problems,
    path: &str,
    unknown: &BTreeMap<String, serde_json::Value>,
    expected: &str,
) {
    for field in unknown.keys() {
        let at = if path.is_empty() {
            field.clone()
        } else {
            format!("{path}.{field}")
        };
        p.push(at, format!("unknown field; expected one of {expected}"));
    }
}

fn limits(
    p: &mut Problems,
    path: &str,
    algorithm: Option<Algorithm>,
    windows: [(&str, Option<u64>, u64); 4],
    unknown: &BTreeMap<String, serde_json::Value>,
    expected: &str,
) -> Vec<Limit> {
    unknown_fields(p, path, unknown, expected);
    let mut out = Vec::new();
    for (name, tokens, window_secs) in windows {
        match tokens {
            Some(0) => p.push(
                format!("{path}.{name}"),
                "must be > 0 (remove the field for no limit over this window)",
            ),
            Some(tokens) => out.push(Limit {
                tokens,
                window_secs,
                algorithm: algorithm.unwrap_or_default(),
            }),
            None => {}
        }
    }
    if out.is_empty() && !windows.iter().any(|w| w.1 == Some(0)) {
        p.push(path, format!("no limit; set one or more of {WINDOWS}"));
    }
    out
}

fn windows(
    s: Option<u64>,
    m: Option<u64>,
    h: Option<u64>,
    d: Option<u64>,
) -> [(&'static str, Option<u64>, u64); 4] {
    [
        ("token_per_second", s, 1),
        ("token_per_minute", m, 60),
        ("token_per_hour", h, 3600),
        ("token_per_day", d, 86_400),
    ]
}

fn header_name(p: &mut Problems, path: String, name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            p.push(
                path,
                format!("`{name}` is not a valid HTTP header name (letters, digits, `-`)"),
            );
            None
        }
    }
}

fn ip_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|net| match net {
            // `::ffff:a.b.c.d/n` ranges match the IPv4 addresses clients are canonicalised to.
            IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                let v4 = v6.addr().to_ipv4_mapped().expect("checked");
                IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix ≤ 32"))
            }
            net => net.trunc(),
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// The source is invalid: only check what does not depend on it.
    Unknown,
    Exact,
    Per,
    Ip,
}

fn compile_item(
    p: &mut Problems,
    i: usize,
    item: &RuleItemConfig,
    custom: Option<&CustomSource>,
) -> Option<Item> {
    let path = format!("rule_items[{i}]");
    unknown_fields(
        p,
        &path,
        &item.unknown,
        &format!("{SOURCES}, limit_keys, secret, paths, methods"),
    );
    let present: Vec<(&'static str, Option<&str>)> = [
        ("limit_by_header", item.limit_by_header.as_deref()),
        ("limit_by_param", item.limit_by_param.as_deref()),
        ("limit_by_cookie", item.limit_by_cookie.as_deref()),
        (
            "limit_by_consumer",
            item.limit_by_consumer.as_ref().map(|_| ""),
        ),
        ("limit_by_per_header", item.limit_by_per_header.as_deref()),
        ("limit_by_per_param", item.limit_by_per_param.as_deref()),
        ("limit_by_per_cookie", item.limit_by_per_cookie.as_deref()),
        (
            "limit_by_per_consumer",
            item.limit_by_per_consumer.as_ref().map(|_| ""),
        ),
        ("limit_by_per_ip", item.limit_by_per_ip.as_deref()),
        ("limit_by_model", item.limit_by_model.as_ref().map(|_| "")),
        (
            "limit_by_per_model",
            item.limit_by_per_model.as_ref().map(|_| ""),
        ),
        (
            "limit_by_composite",
            item.limit_by_composite.as_ref().map(|_| ""),
        ),
    ]
    .into_iter()
    .filter_map(|(field, v)| v.map(|v| (field, Some(v))))
    .collect();

    let mut secret = item.secret.unwrap_or(false);
    let source = match (custom, present.as_slice()) {
        (Some(c), []) => {
            if c.name.is_empty() || c.name.contains([':', '{', '}']) {
                p.push(
                    path.clone(),
                    "the custom key name must be non-empty, without `:`, `{` or `}`",
                );
            }
            Some((
                "limit_by_per_key",
                c.name.clone(),
                KeySource::Custom(c.extractor.clone()),
            ))
        }
        (Some(_), _) => {
            p.push(path.clone(), "a custom key rule takes no limit_by_* field");
            None
        }
        (None, []) => {
            p.push(
                path.clone(),
                format!("no key source; set exactly one of {SOURCES}"),
            );
            None
        }
        (None, [(field, Some(value))]) => {
            let at = format!("{path}.{field}");
            let needs_name = matches!(
                *field,
                "limit_by_header"
                    | "limit_by_param"
                    | "limit_by_cookie"
                    | "limit_by_per_header"
                    | "limit_by_per_param"
                    | "limit_by_per_cookie"
                    | "limit_by_per_ip"
            );
            if needs_name && value.is_empty() {
                p.push(at, "must not be empty");
                None
            } else {
                match *field {
                    "limit_by_header" | "limit_by_per_header" => {
                        header_name(p, at, value).map(|h| {
                            secret |= is_secret_header(&h);
                            (*field, value.to_string(), KeySource::Header(h))
                        })
                    }
                    "limit_by_param" | "limit_by_per_param" => Some((
                        *field,
                        value.to_string(),
                        KeySource::Param(value.to_string()),
                    )),
                    "limit_by_cookie" | "limit_by_per_cookie" => Some((
                        *field,
                        value.to_string(),
                        KeySource::Cookie(value.to_string()),
                    )),
                    "limit_by_consumer" | "limit_by_per_consumer" => {
                        Some((*field, MSE_CONSUMER.to_string(), KeySource::Consumer))
                    }
                    "limit_by_model" | "limit_by_per_model" => {
                        Some((*field, "model".to_string(), KeySource::Model))
                    }
                    "limit_by_composite" => {
                        let parts = item.limit_by_composite.as_deref().unwrap_or_default();
                        composite(p, &at, parts).map(|(name, source, has_secret)| {
                            secret |= has_secret;
                            (*field, name, source)
                        })
                    }
                    _ => {
                        let ip = if *value == "from-remote-addr" {
                            Some(IpSource::RemoteAddr)
                        } else if let Some(h) = value.strip_prefix("from-header-") {
                            header_name(p, at.clone(), h).map(IpSource::Header)
                        } else {
                            p.push(
                                at,
                                format!(
                                    "`{value}` is not an IP source; use `from-remote-addr` or \
                                     `from-header-<name>` (e.g. from-header-x-forwarded-for)"
                                ),
                            );
                            None
                        };
                        ip.map(|ip| ("limit_by_per_ip", value.to_string(), KeySource::Ip(ip)))
                    }
                }
            }
        }
        (None, many) => {
            let names: Vec<&str> = many.iter().map(|(f, _)| *f).collect();
            p.push(
                path.clone(),
                format!(
                    "several key sources ({}); a rule item takes exactly one: split it into \
                     separate rule_items",
                    names.join(", ")
                ),
            );
            None
        }
    };

    let kind = match source.as_ref().map(|s| s.0) {
        None => KeyKind::Unknown,
        Some("limit_by_per_ip") => KeyKind::Ip,
        Some(t) if t.starts_with("limit_by_per_") || t == "limit_by_composite" => KeyKind::Per,
        Some(_) => KeyKind::Exact,
    };
    let source_field = source.as_ref().map_or("limit_by_*", |s| s.0);
    if item.limit_keys.is_empty() {
        p.push(
            format!("{path}.limit_keys"),
            format!("empty; add at least one entry with a key and one of {WINDOWS}"),
        );
    }
    let mut entries = Vec::new();
    for (j, lk) in item.limit_keys.iter().enumerate() {
        let at = format!("{path}.limit_keys[{j}]");
        // The first matching entry wins: one after `*`, or repeating a key, never applies.
        if let Some(i) = item.limit_keys[..j]
            .iter()
            .position(|e| e.key == "*" || e.key == lk.key)
        {
            let earlier = &item.limit_keys[i].key;
            p.push(
                format!("{at}.key"),
                if earlier == "*" {
                    format!(
                        "never applies: limit_keys[{i}] (`*`) matches every value first; \
                         put `*` last"
                    )
                } else {
                    format!(
                        "`{earlier}` again: limit_keys[{i}] matches first, so this entry never \
                         applies; put its windows in that entry (all of an entry's windows apply)"
                    )
                },
            );
        }
        let matcher = matcher(p, &format!("{at}.key"), &lk.key, kind, source_field);
        let limits = limits(
            p,
            &at,
            lk.algorithm,
            windows(
                lk.token_per_second,
                lk.token_per_minute,
                lk.token_per_hour,
                lk.token_per_day,
            ),
            &lk.unknown,
            &format!("key, {WINDOWS}, algorithm"),
        );
        if let Some(matcher) = matcher {
            entries.push(Entry {
                matcher,
                limits,
                key_prefixes: Vec::new(),
            });
        }
    }
    let mut methods = Vec::new();
    for (j, m) in item.methods.iter().flatten().enumerate() {
        match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => methods.push(m),
            Err(_) => p.push(
                format!("{path}.methods[{j}]"),
                format!("`{m}` is not an HTTP method"),
            ),
        }
    }
    // An empty list would mean every path (method): a mistake, not a filter.
    for (field, empty) in [
        ("methods", item.methods.as_ref().is_some_and(Vec::is_empty)),
        ("paths", item.paths.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            p.push(
                format!("{path}.{field}"),
                "empty; list at least one, or leave it out to apply to all",
            );
        }
    }
    let paths = item.paths.clone().unwrap_or_default();
    for (j, pth) in paths.iter().enumerate() {
        if !pth.starts_with('/') {
            p.push(
                format!("{path}.paths[{j}]"),
                format!("`{pth}` must start with `/` (exact, or a prefix ending in `*`)"),
            );
        }
        if pth.trim_end_matches('*').contains('*') || pth.ends_with("**") {
            p.push(
                format!("{path}.paths[{j}]"),
                format!(
                    "`{pth}`: `*` only ends a prefix (`/v1/*`); it matches nothing inside a path"
                ),
            );
        }
    }
    let (limit_type, key_name, source) = source?;
    Some(Item {
        limit_type,
        key_name,
        source,
        entries,
        secret,
        paths,
        methods,
        rule: Arc::from(""),
    })
}

/// `limit_by_composite`: the parts' sources, the key name (`consumer+model`), and whether a part
/// is a secret header (then the whole value is a secret).
fn composite(p: &mut Problems, at: &str, parts: &[String]) -> Option<(String, KeySource, bool)> {
    if parts.len() < 2 {
        p.push(at, "list two or more parts, e.g. [consumer, model]");
        return None;
    }
    let mut sources = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let source = match part.split_once(':') {
            None if part == "consumer" => Some(KeySource::Consumer),
            None if part == "model" => Some(KeySource::Model),
            None if part == "ip" => Some(KeySource::Ip(IpSource::RemoteAddr)),
            Some(("header", name)) => header_name(p, at.clone(), name).map(KeySource::Header),
            Some(("param", name)) if !name.is_empty() => Some(KeySource::Param(name.into())),
            Some(("cookie", name)) if !name.is_empty() => Some(KeySource::Cookie(name.into())),
            _ => {
                p.push(
                    at,
                    format!(
                        "`{part}` is not a part; use consumer, model, ip, header:<name>, \
                         param:<name> or cookie:<name>"
                    ),
                );
                None
            }
        };
        sources.extend(source);
    }
    let secret = sources
        .iter()
        .any(|s| matches!(s, KeySource::Header(h) if is_secret_header(h)));
    (sources.len() == parts.len()).then(|| (parts.join("+"), KeySource::Composite(sources), secret))
}

fn matcher(p: &mut Problems, at: &str, key: &str, kind: KeyKind, source: &str) -> Option<Matcher> {
    if key.is_empty() {
        p.push(at, "missing; every limit_keys entry needs a key");
        return None;
    }
    match kind {
        KeyKind::Unknown => None,
        KeyKind::Ip => {
            if key == "*" {
                return Some(Matcher::Any);
            }
            let net = ip_net(key).map(Matcher::Net);
            if net.is_none() {
                p.push(
                    at,
                    format!(
                        "`{key}` is not an IP address or CIDR range (e.g. 10.0.0.0/8, \
                         2001:db8::/32) or `*`"
                    ),
                );
            }
            net
        }
        KeyKind::Per => {
            if key == "*" {
                Some(Matcher::Any)
            } else if let Some(re) = key.strip_prefix("regexp:") {
                match regex::RegexBuilder::new(&format!("^(?:{re})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                {
                    Ok(re) => Some(Matcher::Regex(re)),
                    Err(e) => {
                        let e = e.to_string().replace('\n', " ");
                        p.push(at, format!("invalid regular expression: {e}"));
                        None
                    }
                }
            } else {
                let exact = if source == "limit_by_composite" {
                    format!("`regexp:{}`", regex::escape(key))
                } else {
                    source.replace("limit_by_per_", "limit_by_")
                };
                p.push(
                    at,
                    format!(
                        "`{key}` is a literal key under {source}, which takes `*` or \
                         `regexp:<re>`; for exact values use {exact}"
                    ),
                );
                None
            }
        }
        KeyKind::Exact => {
            if key == "*" || key.starts_with("regexp:") {
                let per = source.replace("limit_by_", "limit_by_per_");
                p.push(
                    at,
                    format!("`*` and `regexp:` keys need a per-value source; use {per}"),
                );
                None
            } else {
                Some(Matcher::Exact(key.to_string()))
            }
        }
    }
}

fn has_bad_chars(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || c == '{' || c == '}')
}

impl TokenRateLimitConfig {
    /// Validates the whole configuration, reporting every problem.
    pub(crate) fn compile(
        &self,
        customs: &[(usize, CustomSource)],
    ) -> Result<Compiled, ConfigError> {
        let mut p = Problems::default();
        unknown_fields(
            &mut p,
            "",
            &self.unknown,
            "rule_name, global_threshold, rule_items, rejected_code, rejected_msg, \
             consumer_header, trusted_proxies, key_prefix, response_headers, redis, failure_mode, cost, inject_include_usage, \
             request_body_limit, mode, default_output_tokens, metrics_max_models",
        );

        let name = self.rule_name.trim();
        // `,` separates rule names in the `rules` of metrics and tracing.
        let bad = |s: &str| has_bad_chars(s) || s.contains(',');
        let hash_tag = if name.is_empty() {
            p.push(
                "rule_name",
                "required; name this set of limits (e.g. `llm-tokens`)",
            );
            String::new()
        } else if name.len() > 2 && name.starts_with('{') && name.ends_with('}') {
            if bad(&name[1..name.len() - 1]) {
                p.push(
                    "rule_name",
                    "must not contain control characters, `,` or inner `{`/`}`",
                );
            }
            name.to_string()
        } else if bad(name) {
            p.push(
                "rule_name",
                "must not contain control characters, `,` (it separates rule names in metrics) \
                 or `{`/`}` (it becomes the Redis Cluster hash tag `{rule_name}`)",
            );
            String::new()
        } else {
            format!("{{{name}}}")
        };

        let prefix = self.key_prefix.as_deref().unwrap_or(DEFAULT_KEY_PREFIX);
        if prefix.is_empty() || has_bad_chars(prefix) {
            p.push(
                "key_prefix",
                "must be non-empty, without control characters or `{`/`}`",
            );
        }

        let global = self.global_threshold.as_ref().map_or_else(Vec::new, |t| {
            limits(
                &mut p,
                "global_threshold",
                t.algorithm,
                windows(
                    t.token_per_second,
                    t.token_per_minute,
                    t.token_per_hour,
                    t.token_per_day,
                ),
                &t.unknown,
                &format!("{WINDOWS}, algorithm"),
            )
        });
        if self.global_threshold.is_none() && self.rule_items.is_empty() {
            p.push(
                "",
                "nothing to limit: set global_threshold or at least one rule_items entry",
            );
        }

        let mut items: Vec<Item> = self
            .rule_items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let custom = customs.iter().find(|(j, _)| *j == i).map(|(_, c)| c);
                compile_item(&mut p, i, item, custom)
            })
            .collect();

        let rejected_code = match self.rejected_code {
            None => StatusCode::TOO_MANY_REQUESTS,
            Some(code @ 400..=599) => StatusCode::from_u16(code).expect("in range"),
            Some(code) => {
                p.push(
                    "rejected_code",
                    format!("{code} is not an error status; use 400–599 (default 429)"),
                );
                StatusCode::TOO_MANY_REQUESTS
            }
        };

        let consumer_header = self
            .consumer_header
            .as_deref()
            .and_then(|h| header_name(&mut p, "consumer_header".into(), h));
        // A consumer read from a secret header (a key used as the identity) is a secret too.
        if consumer_header.as_ref().is_some_and(is_secret_header) {
            for item in items.iter_mut().filter(|i| i.source.uses_consumer()) {
                item.secret = true;
            }
        }

        let mut trusted_proxies = Vec::new();
        for (i, t) in self.trusted_proxies.iter().enumerate() {
            match ip_net(t.trim()) {
                Some(net) => trusted_proxies.push(net),
                None => p.push(
                    format!("trusted_proxies[{i}]"),
                    format!("`{t}` is not an IP address or CIDR range (e.g. 10.0.0.0/8)"),
                ),
            }
        }

        let cost = self
            .cost
            .as_ref()
            .map_or(Cost::Total, |c| c.compile(&mut p));
        let headers = self.response_headers.clone().unwrap_or_default();
        unknown_fields(&mut p, "response_headers", &headers.unknown, "openai, ietf");

        p.into_result(Compiled {
            rules: Rules::new(
                format!("{prefix}:{hash_tag}"),
                name.trim_matches(['{', '}']).to_owned(),
                global,
                items,
                consumer_header,
                trusted_proxies,
            ),
            rejected_code,
            rejected_msg: self.rejected_msg.as_deref().map(Arc::from),
            openai_headers: headers.openai,
            ietf_headers: headers.ietf,
            failure_mode: self.failure_mode.unwrap_or_default(),
            cost,
            inject_include_usage: self.inject_include_usage.unwrap_or(true),
            request_body_limit: self.request_body_limit.unwrap_or(1 << 20),
            mode: self.mode.unwrap_or_default(),
            default_output_tokens: self.default_output_tokens.unwrap_or(1024),
            metrics_max_models: self
                .metrics_max_models
                .unwrap_or(crate::telemetry::DEFAULT_MAX_MODELS),
        })
    }
}
