//! Metrics through the `metrics` facade (feature `metrics`), with the names of SPEC 7. Without
//! the feature every function here does nothing.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `token_ratelimit_requests_total` | counter | `rule`, `decision` = `allowed` / `rejected` / `failed_open` / `failed_closed` |
//! | `token_ratelimit_tokens_total` | counter (tokens charged) | `rule`, `model`, `estimated` |
//! | `token_ratelimit_store_errors_total` | counter | `store` |
//! | `token_ratelimit_store_seconds` | histogram | `store` |
//! | `token_ratelimit_breaker_open` | gauge (0/1) | `store` |
//! | `token_ratelimit_pending_debits` | gauge | `store` |
//!
//! `rule` is `<rule_name>/<global_threshold|rule_items[i]>`, never a key value. `model` is the
//! request's model for the first `metrics_max_models` models seen (default 64), then `other`.

/// Distinct `model` labels by default.
pub(crate) const DEFAULT_MAX_MODELS: usize = 64;

#[cfg(feature = "metrics")]
mod on {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::lock;

    static MAX_MODELS: AtomicUsize = AtomicUsize::new(super::DEFAULT_MAX_MODELS);
    static MODELS: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    /// Sets how many distinct models get a label of their own (process-wide).
    pub(crate) fn set_max_models(n: usize) {
        MAX_MODELS.store(n, Ordering::Relaxed);
    }

    fn model_label(model: Option<&str>) -> String {
        let Some(model) = model else {
            return "unknown".into();
        };
        let mut seen = lock(&MODELS);
        let seen = seen.get_or_insert_with(HashSet::new);
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MAX_MODELS.load(Ordering::Relaxed) {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".into()
    }

    pub(crate) fn request(rules: &str, decision: &'static str) {
        for rule in rules.split(',') {
            metrics::counter!("token_ratelimit_requests_total", "rule" => rule.to_owned(), "decision" => decision)
                .increment(1);
        }
    }

    pub(crate) fn tokens(rules: &str, model: Option<&str>, estimated: bool, tokens: u64) {
        let model = model_label(model);
        for rule in rules.split(',') {
            metrics::counter!(
                "token_ratelimit_tokens_total",
                "rule" => rule.to_owned(),
                "model" => model.clone(),
                "estimated" => if estimated { "true" } else { "false" }
            )
            .increment(tokens);
        }
    }

    pub(crate) fn store_call(store: &'static str, seconds: f64, ok: bool) {
        metrics::histogram!("token_ratelimit_store_seconds", "store" => store).record(seconds);
        if !ok {
            metrics::counter!("token_ratelimit_store_errors_total", "store" => store).increment(1);
        }
    }

    pub(crate) fn breaker_open(store: &'static str, open: bool) {
        metrics::gauge!("token_ratelimit_breaker_open", "store" => store).set(if open {
            1.0
        } else {
            0.0
        });
    }

    pub(crate) fn pending_debits(store: &'static str, n: usize) {
        metrics::gauge!("token_ratelimit_pending_debits", "store" => store).set(n as f64);
    }
}

#[cfg(feature = "metrics")]
pub(crate) use on::*;

#[cfg(not(feature = "metrics"))]
mod off {
    pub(crate) fn set_max_models(_: usize) {}
    pub(crate) fn request(_: &str, _: &'static str) {}
    pub(crate) fn tokens(_: &str, _: Option<&str>, _: bool, _: u64) {}
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn store_call(_: &'static str, _: f64, _: bool) {}
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn breaker_open(_: &'static str, _: bool) {}
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn pending_debits(_: &'static str, _: usize) {}
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;
