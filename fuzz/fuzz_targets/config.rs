//! The configuration parser and validator: any text is a configuration error or a layer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_token_ratelimit::{TokenRateLimitConfig, TokenRateLimitLayer};

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<TokenRateLimitConfig>(data) {
        if let Err(e) = TokenRateLimitLayer::from_config(cfg) {
            assert!(!e.problems().is_empty());
        }
    }
});
