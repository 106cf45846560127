//! What a client sees: the rejection (HTTP 429 or gRPC `RESOURCE_EXHAUSTED`) and the token
//! headers on admitted responses.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::config::Compiled;
use crate::store::{Counter, CounterStatus};

/// Higress's rejection header: seconds until the exhausted window resets.
pub(crate) const X_TOKENRATELIMIT_RESET: HeaderName =
    HeaderName::from_static("x-tokenratelimit-reset");
/// OpenAI-style headers.
pub(crate) const X_RATELIMIT_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-tokens");
pub(crate) const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
pub(crate) const X_RATELIMIT_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-tokens");

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `RESOURCE_EXHAUSTED`.
const GRPC_RESOURCE_EXHAUSTED: HeaderValue = HeaderValue::from_static("8");
/// `UNAVAILABLE`.
const GRPC_UNAVAILABLE: HeaderValue = HeaderValue::from_static("14");

/// Whole seconds, rounded up, at least 1: a client retrying after this is past the reset.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// Writes OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`.
fn write_openai_duration(out: &mut impl fmt::Write, d: Duration) -> fmt::Result {
    if d < Duration::from_secs(1) {
        out.write_str(itoa::Buffer::new().format(d.as_millis()))?;
        return out.write_str("ms");
    }
    let s = ceil_secs(d);
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut unit = |n: u64, unit: &str| {
        out.write_str(itoa::Buffer::new().format(n))?;
        out.write_str(unit)
    };
    if h > 0 {
        unit(h, "h")?;
    }
    if h > 0 || m > 0 {
        unit(m, "m")?;
    }
    unit(s, "s")
}

fn window_name(window: Duration) -> String {
    match window.as_secs() {
        1 => "second".into(),
        60 => "minute".into(),
        3600 => "hour".into(),
        86_400 => "day".into(),
        s => format!("{s}s"),
    }
}

/// The counter a response's headers describe: the one with the least remaining budget (the
/// latest reset on a tie).
pub(crate) fn tightest<'a>(
    counters: &'a [Counter],
    statuses: &'a [CounterStatus],
) -> Option<(&'a Counter, &'a CounterStatus)> {
    counters.iter().zip(statuses).min_by(|(ca, sa), (cb, sb)| {
        sa.remaining(ca.limit)
            .cmp(&sb.remaining(cb.limit))
            .then(sb.reset.cmp(&sa.reset))
    })
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Adds the IETF headers (draft-ietf-httpapi-ratelimit-headers) for one counter:
/// `RateLimit-Policy: "tokens";q=<limit>;w=<window s>` and
/// `RateLimit: "tokens";r=<remaining>;t=<seconds to reset>`.
pub(crate) fn insert_ietf_headers(headers: &mut HeaderMap, c: &Counter, s: &CounterStatus) {
    let policy = format!("\"tokens\";q={};w={}", c.limit, c.window.as_secs().max(1));
    let state = format!(
        "\"tokens\";r={};t={}",
        s.remaining(c.limit),
        ceil_secs(s.reset)
    );
    for (name, value) in [(RATELIMIT_POLICY, policy), (RATELIMIT, state)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Adds the OpenAI-style token headers for one counter (their values share one allocation).
pub(crate) fn insert_token_headers(headers: &mut HeaderMap, c: &Counter, s: &CounterStatus) {
    let mut values = BytesMut::with_capacity(48);
    let mut number = itoa::Buffer::new();
    values.extend_from_slice(number.format(c.limit).as_bytes());
    let limit_end = values.len();
    values.extend_from_slice(number.format(s.remaining(c.limit)).as_bytes());
    let remaining_end = values.len();
    let _ = write_openai_duration(&mut values, s.reset);
    let values = values.freeze();
    for (name, range) in [
        (X_RATELIMIT_LIMIT_TOKENS, 0..limit_end),
        (X_RATELIMIT_REMAINING_TOKENS, limit_end..remaining_end),
        (X_RATELIMIT_RESET_TOKENS, remaining_end..values.len()),
    ] {
        if let Ok(v) = HeaderValue::from_maybe_shared(values.slice(range)) {
            headers.insert(name, v);
        }
    }
}

/// The rejection for a request some of whose counters cannot take it: spent ones, or in
/// reserve mode ones without room for `amount`. The counter reported is the blocking one that
/// resets last: the request cannot pass before then.
pub(crate) fn rejection(
    settings: &Compiled,
    grpc: bool,
    counters: &[Counter],
    statuses: &[CounterStatus],
    amount: u64,
) -> Response<Bytes> {
    let pairs = || counters.iter().zip(statuses);
    let found = pairs()
        .filter(|(c, s)| !crate::store::reservation_fits(c, s, amount))
        .max_by_key(|(_, s)| s.reset)
        // A store of one's own may refuse what its statuses would admit: the counter that
        // resets last is reported then.
        .or_else(|| pairs().max_by_key(|(_, s)| s.reset));
    let Some((counter, status)) = found else {
        // No counter: not a request the layer limits (statuses come one per counter).
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = settings.rejected_code;
        return r;
    };
    let retry = ceil_secs(status.reset);
    let message = format!(
        "Token rate limit reached: {} tokens per {}. Retry after {retry}s.",
        counter.limit,
        window_name(counter.window)
    );

    let mut response = if grpc {
        grpc_status(GRPC_RESOURCE_EXHAUSTED, &message)
    } else {
        let (body, content_type) = match &settings.rejected_msg {
            Some(msg) => {
                let ct = if serde_json::from_str::<serde::de::IgnoredAny>(msg).is_ok() {
                    "application/json"
                } else {
                    "text/plain; charset=utf-8"
                };
                (Bytes::copy_from_slice(msg.as_bytes()), ct)
            }
            None => (
                Bytes::from(
                    serde_json::json!({"error": {
                        "message": message,
                        "type": "rate_limit_exceeded",
                        "code": "rate_limit_exceeded",
                    }})
                    .to_string(),
                ),
                "application/json",
            ),
        };
        let mut r = Response::new(body);
        *r.status_mut() = settings.rejected_code;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let h = response.headers_mut();
    h.insert(RETRY_AFTER, HeaderValue::from(retry));
    h.insert(X_TOKENRATELIMIT_RESET, HeaderValue::from(retry));
    insert_token_headers(h, counter, status);
    if settings.ietf_headers {
        insert_ietf_headers(h, counter, status);
    }
    response
}

/// The response when the store cannot answer and the failure mode is `closed`.
pub(crate) fn store_unavailable(grpc: bool) -> Response<Bytes> {
    let message = "Token rate limit store unavailable; request not admitted. Retry shortly.";
    if grpc {
        return grpc_status(GRPC_UNAVAILABLE, message);
    }
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "rate_limit_store_unavailable",
        "code": "rate_limit_store_unavailable",
    }});
    let mut r = Response::new(Bytes::from(body.to_string()));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(RETRY_AFTER, HeaderValue::from(1));
    r
}

/// The request body failed while the layer read its start.
pub(crate) fn unreadable_body() -> Response<Bytes> {
    let body = serde_json::json!({"error": {
        "message": "The request body could not be read.",
        "type": "invalid_request_error",
        "code": "unreadable_body",
    }});
    let mut r = Response::new(Bytes::from(body.to_string()));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A trailers-only gRPC answer: HTTP 200 with the status in the headers.
fn grpc_status(code: HeaderValue, message: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::new());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, code);
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    r
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode_grpc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_duration(d: Duration) -> String {
        let mut out = String::new();
        write_openai_duration(&mut out, d).unwrap();
        out
    }

    #[test]
    fn openai_format() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(openai_duration(Duration::from_secs(3605)), "1h0m5s");
        // A token bucket's reset after a debt of 2^64 tokens saturates at `Duration::MAX`.
        assert_eq!(ceil_secs(Duration::MAX), u64::MAX);
        assert_eq!(
            openai_duration(Duration::MAX),
            format!("{}h0m15s", u64::MAX / 3600)
        );
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(percent_encode_grpc("a b%c\n"), "a b%25c%0A");
    }
}
