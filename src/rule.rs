//! Rules: which requests a limit applies to, how their keys are matched, and the counters a
//! request maps to.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::config::{LimitKeyConfig, RuleItemConfig, ThresholdConfig};
use crate::key::{ExtractContext, KeyExtractor, KeySource, KeyValue, RequestView};
use crate::store::{Algorithm, Counter};

/// The Higress consumer header; also the key-name part of consumer counters.
pub(crate) const MSE_CONSUMER: &str = "x-mse-consumer";

/// Values longer than this are stored hashed.
const MAX_RAW_VALUE: usize = 128;

/// One rule item for the builder: where its key comes from and the limits per key.
///
/// Mirrors a Higress `rule_items` entry. Start from a constructor naming the source, add key
/// entries (`any_value`, `value`, `matching`, `ip`), and give each entry one or more windows
/// (`tokens_per_*`). A `tokens_per_*` call before any entry adds an entry for any value (`*`).
///
/// ```
/// use tower_token_ratelimit::Rule;
/// // Every API key: 100k tokens per minute and 2M per day.
/// let rule = Rule::per_header("x-api-key").any_value().tokens_per_minute(100_000).tokens_per_day(2_000_000);
/// // A named tenant gets more, everyone else the default (first matching entry wins).
/// let tiered = Rule::per_header("x-tenant")
///     .matching("big-.*").tokens_per_minute(1_000_000)
///     .any_value().tokens_per_minute(10_000);
/// # let _ = (rule, tiered);
/// ```
#[derive(Clone)]
pub struct Rule {
    pub(crate) kind: RuleKind,
    /// A builder call that does not apply to this kind of rule, reported by `build`.
    pub(crate) misuse: Option<&'static str>,
}

#[derive(Clone)]
pub(crate) enum RuleKind {
    Global(ThresholdConfig),
    Item(RuleItemConfig),
    Custom {
        name: String,
        extractor: Arc<dyn KeyExtractor>,
        item: RuleItemConfig,
    },
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            RuleKind::Global(t) => f.debug_tuple("Rule::global").field(t).finish(),
            RuleKind::Item(i) => f.debug_tuple("Rule").field(i).finish(),
            RuleKind::Custom { name, item, .. } => f
                .debug_tuple("Rule::per_key")
                .field(name)
                .field(item)
                .finish(),
        }
    }
}

macro_rules! item_ctor {
    ($(#[$doc:meta])* $fn:ident, $field:ident) => {
        $(#[$doc])*
        pub fn $fn(name: impl Into<String>) -> Self {
            Self::item(RuleItemConfig { $field: Some(name.into()), ..Default::default() })
        }
    };
}

macro_rules! window_setter {
    ($(#[$doc:meta])* $fn:ident, $field:ident) => {
        $(#[$doc])*
        pub fn $fn(mut self, tokens: u64) -> Self {
            match &mut self.kind {
                RuleKind::Global(t) => t.$field = Some(tokens),
                RuleKind::Item(item) | RuleKind::Custom { item, .. } => {
                    if item.limit_keys.is_empty() {
                        item.limit_keys.push(LimitKeyConfig::new("*"));
                    }
                    let last = item.limit_keys.last_mut().expect("just ensured");
                    last.$field = Some(tokens);
                }
            }
            self
        }
    };
}

impl Rule {
    fn item(item: RuleItemConfig) -> Self {
        Self {
            kind: RuleKind::Item(item),
            misuse: None,
        }
    }

    /// A limit on every request together (Higress `global_threshold`).
    pub fn global() -> Self {
        Self {
            kind: RuleKind::Global(ThresholdConfig::default()),
            misuse: None,
        }
    }

    item_ctor!(
        /// One shared counter per listed value of this header (`limit_by_header`).
        header, limit_by_header
    );
    item_ctor!(
        /// One shared counter per listed value of this query parameter (`limit_by_param`).
        param, limit_by_param
    );
    item_ctor!(
        /// One shared counter per listed value of this cookie (`limit_by_cookie`).
        cookie, limit_by_cookie
    );
    item_ctor!(
        /// One counter per distinct value of this header (`limit_by_per_header`).
        per_header, limit_by_per_header
    );
    item_ctor!(
        /// One counter per distinct value of this query parameter (`limit_by_per_param`).
        per_param, limit_by_per_param
    );
    item_ctor!(
        /// One counter per distinct value of this cookie (`limit_by_per_cookie`).
        per_cookie, limit_by_per_cookie
    );

    /// One shared counter per listed consumer name (`limit_by_consumer`).
    pub fn consumer() -> Self {
        Self::item(RuleItemConfig {
            limit_by_consumer: Some(serde_json::Value::Null),
            ..Default::default()
        })
    }

    /// One counter per consumer (`limit_by_per_consumer`).
    pub fn per_consumer() -> Self {
        Self::item(RuleItemConfig {
            limit_by_per_consumer: Some(serde_json::Value::Null),
            ..Default::default()
        })
    }

    /// One shared counter per listed model (`limit_by_model`): the request's JSON `model`, or
    /// Gemini's `/models/{model}:` path. A request whose body the layer cannot read as JSON
    /// (over `request_body_limit`, compressed, not JSON) has the model `unknown`, which any
    /// value matches and which can be listed.
    pub fn model() -> Self {
        Self::item(RuleItemConfig {
            limit_by_model: Some(serde_json::Value::Null),
            ..Default::default()
        })
    }

    /// One counter per model (`limit_by_per_model`).
    pub fn per_model() -> Self {
        Self::item(RuleItemConfig {
            limit_by_per_model: Some(serde_json::Value::Null),
            ..Default::default()
        })
    }

    /// One counter per combination of sources (`limit_by_composite`), e.g.
    /// `Rule::composite(["consumer", "model"])` for a budget per consumer and model. Parts:
    /// `consumer`, `model`, `ip`, `header:<name>`, `param:<name>`, `cookie:<name>`; keys match
    /// the values joined with `|` (`alice|gpt-4o`).
    pub fn composite<I>(parts: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::item(RuleItemConfig {
            limit_by_composite: Some(parts.into_iter().map(Into::into).collect()),
            ..Default::default()
        })
    }

    /// Applies the rule only to these paths: exact, or a prefix ending in `*`. A rule with
    /// paths or methods counts in counters of its own, apart from a rule on the same values
    /// without them or with others.
    pub fn paths<I>(mut self, paths: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        match &mut self.kind {
            RuleKind::Item(item) | RuleKind::Custom { item, .. } => {
                item.paths = Some(paths.into_iter().map(Into::into).collect());
            }
            RuleKind::Global(_) => {
                self.misuse = Some("paths() applies to rule items, not Rule::global()")
            }
        }
        self
    }

    /// Applies the rule only to these methods.
    pub fn methods<I>(mut self, methods: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        match &mut self.kind {
            RuleKind::Item(item) | RuleKind::Custom { item, .. } => {
                item.methods = Some(methods.into_iter().map(Into::into).collect());
            }
            RuleKind::Global(_) => {
                self.misuse = Some("methods() applies to rule items, not Rule::global()")
            }
        }
        self
    }

    /// One counter per client IP, from the TCP peer (`limit_by_per_ip: from-remote-addr`).
    pub fn per_ip() -> Self {
        Self::item(RuleItemConfig {
            limit_by_per_ip: Some("from-remote-addr".into()),
            ..Default::default()
        })
    }

    /// One counter per client IP taken from a forwarding header such as `x-forwarded-for`
    /// (`limit_by_per_ip: from-header-<name>`): the right-most address that is not one of the
    /// [trusted proxies](crate::TokenRateLimitLayerBuilder::trusted_proxies).
    pub fn per_ip_from_header(header: impl AsRef<str>) -> Self {
        Self::item(RuleItemConfig {
            limit_by_per_ip: Some(format!("from-header-{}", header.as_ref())),
            ..Default::default()
        })
    }

    /// One counter per value computed by your own extractor. `name` is the key-name part of the
    /// counter key (limit type `limit_by_per_key`).
    pub fn per_key(name: impl Into<String>, extractor: impl KeyExtractor) -> Self {
        Self {
            kind: RuleKind::Custom {
                name: name.into(),
                extractor: Arc::new(extractor),
                item: RuleItemConfig::default(),
            },
            misuse: None,
        }
    }

    fn entry(mut self, key: String) -> Self {
        if let RuleKind::Item(item) | RuleKind::Custom { item, .. } = &mut self.kind {
            item.limit_keys.push(LimitKeyConfig::new(key));
        }
        self
    }

    /// Starts an entry for any value (`*`), for `per_*` rules.
    pub fn any_value(self) -> Self {
        self.entry("*".into())
    }

    /// Starts an entry for one exact value, for non-`per` rules (`header`, `param`, `cookie`,
    /// `consumer`).
    pub fn value(self, value: impl Into<String>) -> Self {
        self.entry(value.into())
    }

    /// Starts an entry for values matching a regular expression (`regexp:<re>`), anchored at
    /// both ends, for `per_*` rules.
    pub fn matching(self, regex: impl AsRef<str>) -> Self {
        self.entry(format!("regexp:{}", regex.as_ref()))
    }

    /// Starts an entry for client IPs in an address or CIDR range, for `per_ip` rules.
    pub fn ip(self, ip_or_cidr: impl Into<String>) -> Self {
        self.entry(ip_or_cidr.into())
    }

    /// Marks the values of this rule as secrets: they are hashed in counter keys and never
    /// logged. Always on for the `authorization`, `proxy-authorization`, `x-api-key`, `api-key`
    /// and `x-goog-api-key` headers, and for composites with one of them as a part.
    pub fn secret(mut self) -> Self {
        if let RuleKind::Item(item) | RuleKind::Custom { item, .. } = &mut self.kind {
            item.secret = Some(true);
        }
        self
    }

    /// Sets the algorithm of the current entry's limits (or the global threshold's):
    /// fixed window (default), sliding window or token bucket.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        match &mut self.kind {
            RuleKind::Global(t) => t.algorithm = Some(algorithm),
            RuleKind::Item(item) | RuleKind::Custom { item, .. } => {
                if item.limit_keys.is_empty() {
                    item.limit_keys.push(LimitKeyConfig::new("*"));
                }
                item.limit_keys.last_mut().expect("just ensured").algorithm = Some(algorithm);
            }
        }
        self
    }

    window_setter!(
        /// Adds a per-second limit to the current entry (`token_per_second`).
        tokens_per_second, token_per_second
    );
    window_setter!(
        /// Adds a per-minute limit to the current entry (`token_per_minute`).
        tokens_per_minute, token_per_minute
    );
    window_setter!(
        /// Adds a per-hour limit to the current entry (`token_per_hour`).
        tokens_per_hour, token_per_hour
    );
    window_setter!(
        /// Adds a per-day limit to the current entry (`token_per_day`).
        tokens_per_day, token_per_day
    );
}

/// A token budget over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit {
    pub(crate) tokens: u64,
    pub(crate) window_secs: u64,
    pub(crate) algorithm: Algorithm,
}

impl Limit {
    /// The window part of a counter key: the seconds (Higress) for fixed windows; prefixed by
    /// the algorithm otherwise, so counters of different algorithms never share a key.
    pub(crate) fn window_key(&self) -> String {
        match self.algorithm {
            Algorithm::FixedWindow => self.window_secs.to_string(),
            Algorithm::SlidingWindow => format!("sliding{}", self.window_secs),
            Algorithm::TokenBucket => format!("bucket{}", self.window_secs),
        }
    }
}

/// How a `limit_keys` entry matches a value.
#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Any,
    Exact(String),
    Regex(Regex),
    Net(IpNet),
}

impl Matcher {
    fn matches(&self, value: &KeyValue<'_>) -> bool {
        match (self, value) {
            (Matcher::Any, _) => true,
            (Matcher::Exact(s), KeyValue::Text { text, raw: None }) => s == text,
            (Matcher::Regex(re), KeyValue::Text { text, .. }) => re.is_match(text),
            (Matcher::Net(net), KeyValue::Ip(ip)) => net.contains(ip),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) matcher: Matcher,
    pub(crate) limits: Vec<Limit>,
    /// Per limit, its counter key up to the value (filled by [`Rules::new`]).
    pub(crate) key_prefixes: Vec<Box<str>>,
}

/// A validated rule item.
#[derive(Clone)]
pub(crate) struct Item {
    /// The Higress limit type (`limit_by_per_header`, ...), part of the counter key.
    pub(crate) limit_type: &'static str,
    /// The key-name part of the counter key (header name, `x-mse-consumer`, `from-remote-addr`).
    pub(crate) key_name: String,
    pub(crate) source: KeySource,
    pub(crate) entries: Vec<Entry>,
    pub(crate) secret: bool,
    /// The item applies only to these paths (exact, or a prefix ending in `*`); all if empty.
    pub(crate) paths: Vec<String>,
    /// The item applies only to these methods; all if empty.
    pub(crate) methods: Vec<http::Method>,
    /// `<rule_name>/rule_items[i]` (filled by [`Rules::new`]).
    pub(crate) rule: Arc<str>,
}

impl Item {
    /// What an item limited to some paths or methods adds to its counters' key name: `@` and
    /// 64 bits of the SHA-256 of its conditions (sorted), so that two items differing only in
    /// them keep separate budgets. Empty for an item without conditions: Higress's layout.
    fn conditions(&self) -> String {
        if self.paths.is_empty() && self.methods.is_empty() {
            return String::new();
        }
        let mut paths: Vec<&str> = self.paths.iter().map(String::as_str).collect();
        paths.sort_unstable();
        paths.dedup();
        let mut methods: Vec<&str> = self.methods.iter().map(http::Method::as_str).collect();
        methods.sort_unstable();
        methods.dedup();
        let mut out = String::from("@");
        let conditions = format!("{}\n\n{}", paths.join("\n"), methods.join("\n"));
        push_sha256_hex(&mut out, conditions.as_bytes(), 8);
        out
    }

    fn applies(&self, req: &RequestView<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(req.method()) {
            return false;
        }
        if self.paths.is_empty() {
            return true;
        }
        // As the upstream routes it: an escaped or dotted spelling is the same path.
        let path = crate::request::normalized_path(req.uri().path());
        self.paths.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => *path == **p,
        })
    }
}

/// Everything needed to map a request to its counters.
#[derive(Clone)]
pub(crate) struct Rules {
    pub(crate) global: Vec<Limit>,
    pub(crate) items: Vec<Item>,
    pub(crate) consumer_header: Option<HeaderName>,
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// The global threshold's counters, which every request has.
    global_counters: Vec<Matched>,
}

/// A counter a request matched, with the rule it came from (for logs).
#[derive(Debug, Clone)]
pub(crate) struct Matched {
    pub(crate) counter: Counter,
    /// `global_threshold` or `rule_items[i]`.
    pub(crate) rule: Arc<str>,
}

impl Rules {
    /// Rules, with what every request needs computed once: the global counters, the items'
    /// names and their counter keys up to the value. Keys start with `key_base`
    /// (`<prefix>:{<rule_name>}`); logs and metrics name rules `<rule_name>/rule_items[i]`.
    pub(crate) fn new(
        key_base: String,
        rule_name: String,
        global: Vec<Limit>,
        mut items: Vec<Item>,
        consumer_header: Option<HeaderName>,
        trusted_proxies: Vec<IpNet>,
    ) -> Self {
        let mut global_counters = Vec::new();
        let global_rule: Arc<str> = format!("{rule_name}/global_threshold").into();
        for limit in &global {
            let key = format!("{key_base}:global_threshold:{}", limit.window_key());
            push(&mut global_counters, &key, limit, &global_rule);
        }
        for (i, item) in items.iter_mut().enumerate() {
            item.rule = format!("{rule_name}/rule_items[{i}]").into();
            let conditions = item.conditions();
            for entry in &mut item.entries {
                entry.key_prefixes = entry
                    .limits
                    .iter()
                    .map(|limit| {
                        let window = limit.window_key();
                        format!(
                            "{key_base}:{}:{window}:{}{conditions}:",
                            item.limit_type, item.key_name
                        )
                        .into()
                    })
                    .collect();
            }
        }
        Self {
            global,
            items,
            consumer_header,
            trusted_proxies,
            global_counters,
        }
    }

    /// Whether a rule keys on the model, so the request body must be read before matching.
    pub(crate) fn needs_model(&self) -> bool {
        self.items.iter().any(|i| i.source.needs_model())
    }

    /// The counters this request is limited by: the global threshold's, then, for every rule
    /// item whose source yields a value, those of its first matching entry. Duplicates (the
    /// same counter key from two items) are kept once, with the smaller limit.
    pub(crate) fn counters(&self, req: &RequestView<'_>, model: Option<&str>) -> Vec<Matched> {
        if self.items.is_empty() {
            return self.global_counters.clone();
        }
        let mut out = Vec::with_capacity(self.global_counters.len() + self.items.len());
        out.extend_from_slice(&self.global_counters);
        let cx = ExtractContext {
            consumer_header: self.consumer_header.as_ref(),
            trusted_proxies: &self.trusted_proxies,
            model,
        };
        // Room for the usual keys at once: a prefix, and a value up to a hashed one's length.
        let mut key = String::with_capacity(256);
        for item in &self.items {
            if !item.applies(req) {
                continue;
            }
            let Some(value) = item.source.extract(req, &cx) else {
                continue;
            };
            let Some(entry) = item.entries.iter().find(|e| e.matcher.matches(&value)) else {
                continue;
            };
            // The first key is built whole; the others reuse its value part.
            key.clear();
            let mut stored = None;
            for (limit, prefix) in entry.limits.iter().zip(&entry.key_prefixes) {
                let start = key.len();
                key.push_str(prefix);
                match stored.clone() {
                    Some(range) => key.extend_from_within(range),
                    None => {
                        let value_start = key.len();
                        push_stored_value(&mut key, &value, item.secret);
                        stored = Some(value_start..key.len());
                    }
                }
                push(&mut out, &key[start..], limit, &item.rule);
            }
        }
        out
    }
}

fn push(out: &mut Vec<Matched>, key: &str, limit: &Limit, rule: &Arc<str>) {
    if let Some(existing) = out.iter_mut().find(|m| *m.counter.key == *key) {
        existing.counter.limit = existing.counter.limit.min(limit.tokens);
        return;
    }
    out.push(Matched {
        counter: Counter {
            key: key.into(),
            limit: limit.tokens,
            window: Duration::from_secs(limit.window_secs),
            algorithm: limit.algorithm,
        },
        rule: rule.clone(),
    });
}

/// Appends the value part of a counter key: the value itself when it is short and plain,
/// otherwise a SHA-256 prefix (128 bits). The hashed form contains `:`, which a raw value never
/// does, so a raw value can never address a hashed counter.
fn push_stored_value(out: &mut String, value: &KeyValue<'_>, secret: bool) {
    match value {
        // A parsed, canonical address: safe as is (IPv6 colons included), as Higress stores it.
        KeyValue::Ip(ip) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
        KeyValue::Text { raw: Some(raw), .. } => push_hashed(out, raw),
        KeyValue::Text { text, raw: None } => {
            if secret
                || text.len() > MAX_RAW_VALUE
                || text
                    .chars()
                    .any(|c| matches!(c, '{' | '}' | ':') || c.is_control())
            {
                push_hashed(out, text.as_bytes());
            } else {
                out.push_str(text);
            }
        }
    }
}

/// Appends `sha256:` and the first 16 bytes of the value's SHA-256, in hex.
fn push_hashed(out: &mut String, bytes: &[u8]) {
    out.push_str("sha256:");
    push_sha256_hex(out, bytes, 16);
}

/// Appends the first `len` bytes of the SHA-256 of `bytes`, in hex.
fn push_sha256_hex(out: &mut String, bytes: &[u8], len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in &Sha256::digest(bytes)[..len] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn text(s: &str) -> KeyValue<'_> {
        KeyValue::Text {
            text: Cow::Borrowed(s),
            raw: None,
        }
    }

    fn stored_value(value: &KeyValue<'_>, secret: bool) -> String {
        let mut out = String::new();
        push_stored_value(&mut out, value, secret);
        out
    }

    #[test]
    fn stored_values() {
        assert_eq!(stored_value(&text("alice"), false), "alice");
        assert!(stored_value(&text("alice"), true).starts_with("sha256:"));
        assert!(stored_value(&text("a:b"), false).starts_with("sha256:"));
        assert!(stored_value(&text("{x}"), false).starts_with("sha256:"));
        assert!(stored_value(&text("a\tb"), false).starts_with("sha256:"));
        assert!(stored_value(&text(&"x".repeat(129)), false).starts_with("sha256:"));
        assert_eq!(stored_value(&text(&"x".repeat(128)), false).len(), 128);
        assert_ne!(
            stored_value(&text("a:b"), false),
            stored_value(&text("a:c"), false)
        );
        assert_eq!(
            stored_value(&KeyValue::Ip("2001:db8::1".parse().unwrap()), false),
            "2001:db8::1"
        );
    }
}
