//! The layer and its builder.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use tower_layer::Layer;

use crate::allowance::Allowances;
use crate::config::{
    Compiled, CustomSource, FailureMode, Mode, RuleItemConfig, TokenRateLimitConfig,
};
use crate::cost::{Cost, CostConfig};
use crate::error::{ConfigError, Problem};
use crate::rule::{Rule, RuleKind};
use crate::service::TokenRateLimit;
use crate::settle::Settler;
use crate::store::{MemoryStore, Store};
use crate::telemetry;
use crate::usage::UsageExtractor;

/// What every service made by one layer shares.
pub(crate) struct Shared {
    /// The validated settings; swapped whole by [`TokenRateLimitLayer::reload`].
    pub(crate) compiled: ArcSwap<Compiled>,
    pub(crate) store: Arc<dyn Store>,
    /// The in-memory store decisions fall back to in `local` failure mode.
    pub(crate) fallback: Option<MemoryStore>,
    /// Reads usage from response headers and trailers.
    pub(crate) extractor: Option<Arc<dyn UsageExtractor>>,
    /// Reserve mode's learned output allowances.
    pub(crate) allowances: Allowances,
    /// The builder's [`Rule::per_key`] rules, which a configuration cannot express: kept
    /// across reloads.
    custom_rules: Vec<(RuleItemConfig, CustomSource)>,
    settler: OnceLock<Settler>,
}

impl Shared {
    /// The settlement worker, started on first use (inside the runtime serving requests).
    pub(crate) fn settler(&self) -> &Settler {
        self.settler
            .get_or_init(|| Settler::start(self.store.clone(), self.fallback.clone()))
    }
}

/// Applies LLM token rate limiting to a service.
///
/// Build one with [`TokenRateLimitLayer::builder`] or [`TokenRateLimitLayer::from_config`].
/// It is `Clone + Send + Sync`; clones share rules, store and settlement worker. Use it with
/// `Router::layer`, `Router::route_layer` or `tower::ServiceBuilder`.
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::{Router, routing::post};
/// use tower_token_ratelimit::{Rule, TokenRateLimitLayer};
///
/// # async fn proxy() -> &'static str { "" }
/// let app: Router = Router::new()
///     .route("/v1/chat/completions", post(proxy))
///     .layer(
///         TokenRateLimitLayer::builder()
///             .rule(Rule::per_header("x-api-key").any_value().tokens_per_minute(100_000))
///             .build()
///             .expect("valid limits"),
///     );
/// # }
/// ```
#[derive(Clone)]
pub struct TokenRateLimitLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TokenRateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRateLimitLayer")
            .field("rule_items", &self.shared.compiled.load().rules.items.len())
            .field(
                "global",
                &!self.shared.compiled.load().rules.global.is_empty(),
            )
            .finish_non_exhaustive()
    }
}

impl TokenRateLimitLayer {
    /// Starts a builder: no rules, the in-memory store, rule name `default`.
    pub fn builder() -> TokenRateLimitLayerBuilder {
        TokenRateLimitLayerBuilder::default()
    }

    /// Builds a layer from a Higress-vocabulary configuration: on Redis when it has a `redis:`
    /// block, otherwise on the in-memory store. Nothing connects here.
    pub fn from_config(config: TokenRateLimitConfig) -> Result<Self, ConfigError> {
        Self::builder().config(config).build()
    }

    /// Waits until every debit handed to the background worker so far has been written to the
    /// store. Call it before shutting down, or in tests before reading counters. Responses still
    /// streaming are not waited for.
    pub async fn flush(&self) {
        if let Some(settler) = self.shared.settler.get() {
            settler.flush().await;
        }
    }

    /// Replaces the limits (and the other settings of a configuration) of a running layer,
    /// for every service it made; counters keep their used tokens, since their keys do not
    /// change unless `rule_name` or `key_prefix` does. Requests already admitted finish under
    /// the settings they started with. The store is not changed (a `redis` block is checked,
    /// not applied); rules added with [`Rule::per_key`], which a configuration cannot express,
    /// are kept (after the configuration's rule items). On a problem nothing changes.
    ///
    /// ```
    /// # use tower_token_ratelimit::{TokenRateLimitConfig, TokenRateLimitLayer};
    /// let cfg = |n: u64| -> TokenRateLimitConfig {
    ///     serde_json::from_value(serde_json::json!({"rule_name": "r", "global_threshold": {"token_per_minute": n}})).unwrap()
    /// };
    /// let layer = TokenRateLimitLayer::from_config(cfg(1000))?;
    /// layer.reload(cfg(5000))?;
    /// # Ok::<_, tower_token_ratelimit::ConfigError>(())
    /// ```
    pub fn reload(&self, mut config: TokenRateLimitConfig) -> Result<(), ConfigError> {
        // The builder's `Rule::per_key` rules go after the configuration's items.
        let mut customs = Vec::with_capacity(self.shared.custom_rules.len());
        for (item, source) in &self.shared.custom_rules {
            customs.push((config.rule_items.len(), source.clone()));
            config.rule_items.push(item.clone());
        }
        // The `redis` block is checked though not applied: a file the running layer accepts
        // must not be refused at the next start.
        let redis = config
            .redis
            .as_ref()
            .map_or(Ok(()), |r| redis_store(r).map(drop));
        let (compiled, ()) = ConfigError::combine(config.compile(&customs), redis)?;
        if compiled.failure_mode == FailureMode::Local && self.shared.fallback.is_none() {
            return Err(ConfigError::new(vec![Problem {
                path: "failure_mode".into(),
                message: "`local` needs the in-memory fallback made when the layer is built; \
                          build it with failure_mode local"
                    .into(),
            }]));
        }
        telemetry::set_max_models(compiled.metrics_max_models);
        self.shared.compiled.store(Arc::new(compiled));
        Ok(())
    }

    /// Debits handed to the background worker and not yet written.
    pub fn pending_debits(&self) -> u64 {
        self.shared.settler.get().map_or(0, Settler::pending)
    }
}

impl<S> Layer<S> for TokenRateLimitLayer {
    type Service = TokenRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenRateLimit::new(inner, self.shared.clone())
    }
}

/// Builds a [`TokenRateLimitLayer`]; every setter takes and returns the builder by value, and
/// [`build`](Self::build) validates everything at once.
///
/// ```
/// use tower_token_ratelimit::{Rule, TokenRateLimitLayer};
///
/// let layer = TokenRateLimitLayer::builder()
///     .rule_name("llm")
///     .rule(Rule::global().tokens_per_minute(1_000_000))
///     .rule(Rule::per_header("x-api-key").any_value().tokens_per_minute(100_000))
///     .rule(Rule::per_ip_from_header("x-forwarded-for").ip("0.0.0.0/0").tokens_per_hour(500_000))
///     .trusted_proxies(["10.0.0.0/8"])
///     .memory()
///     .build()?;
/// # Ok::<_, tower_token_ratelimit::ConfigError>(())
/// ```
#[must_use]
pub struct TokenRateLimitLayerBuilder {
    config: TokenRateLimitConfig,
    customs: Vec<(usize, CustomSource)>,
    globals: usize,
    misuses: Vec<Problem>,
    store: Option<Arc<dyn Store>>,
    extractor: Option<Arc<dyn UsageExtractor>>,
}

impl Default for TokenRateLimitLayerBuilder {
    fn default() -> Self {
        Self {
            config: TokenRateLimitConfig {
                rule_name: "default".into(),
                ..Default::default()
            },
            customs: Vec::new(),
            globals: 0,
            misuses: Vec::new(),
            store: None,
            extractor: None,
        }
    }
}

impl std::fmt::Debug for TokenRateLimitLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRateLimitLayerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenRateLimitLayerBuilder {
    /// Replaces the limits and settings with those of a configuration; rules added with
    /// [`rule`](Self::rule) afterwards are added to its `rule_items`.
    pub fn config(mut self, config: TokenRateLimitConfig) -> Self {
        self.globals = usize::from(config.global_threshold.is_some());
        self.customs.clear();
        self.config = config;
        self
    }

    /// Names this set of limits; part of every counter key (default `default`).
    pub fn rule_name(mut self, name: impl Into<String>) -> Self {
        self.config.rule_name = name.into();
        self
    }

    /// Adds a rule. All matching rules apply; a request is rejected when any of its counters
    /// is spent.
    pub fn rule(mut self, rule: Rule) -> Self {
        if let Some(message) = rule.misuse {
            self.misuses.push(Problem {
                path: "global_threshold".into(),
                message: message.into(),
            });
        }
        match rule.kind {
            RuleKind::Global(t) => {
                self.globals += 1;
                self.config.global_threshold = Some(t);
            }
            RuleKind::Item(item) => self.config.rule_items.push(item),
            RuleKind::Custom {
                name,
                extractor,
                item,
            } => {
                self.customs.push((
                    self.config.rule_items.len(),
                    CustomSource { name, extractor },
                ));
                self.config.rule_items.push(item);
            }
        }
        self
    }

    /// Keeps counters in process memory (the default).
    pub fn memory(mut self) -> Self {
        self.store = Some(Arc::new(MemoryStore::new()));
        self
    }

    /// Keeps counters in Redis: a [`RedisStore`](crate::store::RedisStore), or a
    /// `deadpool_redis::Pool` / `deadpool_redis::cluster::Pool` the application already has.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(self, store: impl Into<crate::store::RedisStore>) -> Self {
        self.store(store.into())
    }

    /// Also reads usage from response headers and trailers (e.g.
    /// [`HeaderUsage`](crate::usage::HeaderUsage) for a gRPC service); usage in the body wins.
    pub fn usage_extractor(mut self, extractor: impl UsageExtractor) -> Self {
        self.extractor = Some(Arc::new(extractor));
        self
    }

    /// When tokens are counted: [`Mode::PostDebit`] (default) or [`Mode::Reserve`].
    pub fn mode(mut self, mode: Mode) -> Self {
        self.config.mode = Some(mode);
        self
    }

    /// In reserve mode, the output allowance of requests without `max_tokens` until one is
    /// learned (default 1024).
    pub fn default_output_tokens(mut self, tokens: u64) -> Self {
        self.config.default_output_tokens = Some(tokens);
        self
    }

    /// How many distinct models the tokens metric labels by name before it says `other`
    /// (default 64; feature `metrics`). The metrics registry is the process's, so this is too:
    /// the last layer built or reloaded sets it.
    pub fn metrics_max_models(mut self, n: usize) -> Self {
        self.config.metrics_max_models = Some(n);
        self
    }

    /// Whether streaming OpenAI chat / completions requests that did not ask for usage are made
    /// to (`stream_options.include_usage`), with the extra usage chunk removed from what the
    /// client receives (default true). Such a request also asks for an unencoded response
    /// (`Accept-Encoding: identity`): the chunk cannot be removed from a compressed stream.
    pub fn inject_include_usage(mut self, on: bool) -> Self {
        self.config.inject_include_usage = Some(on);
        self
    }

    /// Largest request body read to ask for usage (default 1 MiB).
    pub fn request_body_limit(mut self, bytes: usize) -> Self {
        self.config.request_body_limit = Some(bytes);
        self
    }

    /// How reported usage becomes the tokens debited (default [`Cost::Total`]).
    pub fn cost(mut self, cost: Cost) -> Self {
        let (preset, weights) = match cost {
            Cost::Total => (Some("total"), None),
            Cost::InputOutput => (Some("input_output"), None),
            Cost::Weights(w) => (None, Some(w)),
        };
        self.config.cost = Some(CostConfig {
            preset: preset.map(str::to_owned),
            weights,
        });
        self
    }

    /// What to do when the store cannot answer (default [`FailureMode::Open`]).
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.config.failure_mode = Some(mode);
        self
    }

    /// Keeps counters in this store (e.g. a shared [`MemoryStore`], or your own [`Store`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Trusts this request header to carry the consumer name (e.g. `x-mse-consumer`). Only set
    /// it when a gateway in front strips the header from client requests.
    pub fn consumer_header(mut self, header: impl Into<String>) -> Self {
        self.config.consumer_header = Some(header.into());
        self
    }

    /// Proxies (IPs or CIDR ranges) whose entries are skipped, from the right, when the client
    /// IP is read from a forwarding header.
    pub fn trusted_proxies<I>(mut self, proxies: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.config.trusted_proxies = proxies.into_iter().map(Into::into).collect();
        self
    }

    /// The status of a rejection (default 429).
    pub fn rejected_code(mut self, code: u16) -> Self {
        self.config.rejected_code = Some(code);
        self
    }

    /// The body of a rejection, sent as is (default: an OpenAI-style JSON error).
    pub fn rejected_msg(mut self, body: impl Into<String>) -> Self {
        self.config.rejected_msg = Some(body.into());
        self
    }

    /// The prefix of every counter key (default `higress-token-ratelimit`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = Some(prefix.into());
        self
    }

    /// Whether admitted responses carry `x-ratelimit-*-tokens` headers (default true).
    pub fn openai_headers(mut self, on: bool) -> Self {
        self.config
            .response_headers
            .get_or_insert_with(Default::default)
            .openai = on;
        self
    }

    /// Whether admitted responses (and rejections) carry the IETF `RateLimit-Policy` and
    /// `RateLimit` headers (default false).
    pub fn ietf_headers(mut self, on: bool) -> Self {
        self.config
            .response_headers
            .get_or_insert_with(Default::default)
            .ietf = on;
        self
    }

    /// Validates everything and builds the layer; every problem is reported at once.
    /// Nothing is connected here.
    pub fn build(self) -> Result<TokenRateLimitLayer, ConfigError> {
        let mut problems = Vec::new();
        let compiled = self
            .config
            .compile(&self.customs)
            .map_err(|e| problems.extend_from_slice(e.problems()))
            .ok();
        problems.extend(self.misuses);
        if self.globals > 1 {
            problems.push(Problem {
                path: "global_threshold".into(),
                message: "set once; put every window in one Rule::global()".into(),
            });
        }
        let store = match (self.store, &self.config.redis) {
            (Some(store), _) => Some(store),
            (None, None) => Some(Arc::new(MemoryStore::new()) as Arc<dyn Store>),
            (None, Some(redis)) => redis_store(redis)
                .map_err(|e| problems.extend_from_slice(e.problems()))
                .ok(),
        };
        let (Some(compiled), Some(store), true) = (compiled, store, problems.is_empty()) else {
            return Err(ConfigError::new(problems));
        };
        let custom_rules = self
            .customs
            .into_iter()
            .map(|(i, source)| (self.config.rule_items[i].clone(), source))
            .collect();
        let fallback = (compiled.failure_mode == FailureMode::Local).then(MemoryStore::new);
        telemetry::set_max_models(compiled.metrics_max_models);
        Ok(TokenRateLimitLayer {
            shared: Arc::new(Shared {
                compiled: ArcSwap::from_pointee(compiled),
                store,
                fallback,
                extractor: self.extractor,
                allowances: Allowances::default(),
                custom_rules,
                settler: OnceLock::new(),
            }),
        })
    }
}

#[cfg(feature = "redis")]
fn redis_store(config: &crate::config::RedisConfig) -> Result<Arc<dyn Store>, ConfigError> {
    Ok(Arc::new(crate::store::RedisStore::from_config(config)?))
}

#[cfg(not(feature = "redis"))]
fn redis_store(_: &crate::config::RedisConfig) -> Result<Arc<dyn Store>, ConfigError> {
    Err(ConfigError::new(vec![Problem {
        path: "redis".into(),
        message: "this build has no Redis store; enable the `redis` feature of \
                  tower-token-ratelimit"
            .into(),
    }]))
}
