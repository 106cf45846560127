//! Usage reported outside the body: in response headers or trailers (e.g. a tonic service).

use http::HeaderMap;

use super::Usage;

/// Reads usage from a response's headers and trailers, for services that do not report it in
/// an OpenAI-, Anthropic- or Gemini-shaped body (a gRPC service can put it in its trailers).
///
/// Usage found in the body wins; otherwise the trailers', then the headers'. Implemented for
/// closures `Fn(&HeaderMap) -> Option<Usage>`, which are given the headers and then the
/// trailers.
///
/// ```
/// use tower_token_ratelimit::usage::{Usage, UsageExtractor};
/// let from_header = |h: &http::HeaderMap| -> Option<Usage> {
///     let total = h.get("x-tokens")?.to_str().ok()?.parse().ok()?;
///     Some(Usage { total_tokens: Some(total), ..Default::default() })
/// };
/// let mut h = http::HeaderMap::new();
/// h.insert("x-tokens", "42".parse().unwrap());
/// assert_eq!(from_header.in_headers(&h).unwrap().total(), 42);
/// ```
pub trait UsageExtractor: Send + Sync + 'static {
    /// Usage in the response headers, if any.
    fn in_headers(&self, headers: &HeaderMap) -> Option<Usage> {
        let _ = headers;
        None
    }

    /// Usage in the response trailers, if any.
    fn in_trailers(&self, trailers: &HeaderMap) -> Option<Usage> {
        let _ = trailers;
        None
    }
}

impl<F> UsageExtractor for F
where
    F: Fn(&HeaderMap) -> Option<Usage> + Send + Sync + 'static,
{
    fn in_headers(&self, headers: &HeaderMap) -> Option<Usage> {
        self(headers)
    }

    fn in_trailers(&self, trailers: &HeaderMap) -> Option<Usage> {
        self(trailers)
    }
}

/// The built-in [`UsageExtractor`]: token counts in headers or trailers named
/// `x-usage-input-tokens`, `x-usage-output-tokens` and `x-usage-total-tokens` (or names of your
/// choice). Values must be plain non-negative integers; anything else counts as not reported.
#[derive(Debug, Clone)]
pub struct HeaderUsage {
    input: http::HeaderName,
    output: http::HeaderName,
    total: http::HeaderName,
}

impl Default for HeaderUsage {
    fn default() -> Self {
        Self {
            input: http::HeaderName::from_static("x-usage-input-tokens"),
            output: http::HeaderName::from_static("x-usage-output-tokens"),
            total: http::HeaderName::from_static("x-usage-total-tokens"),
        }
    }
}

impl HeaderUsage {
    /// Reads the three default names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses these names for the input, output and total counts.
    pub fn names(
        input: http::HeaderName,
        output: http::HeaderName,
        total: http::HeaderName,
    ) -> Self {
        Self {
            input,
            output,
            total,
        }
    }

    fn read(&self, h: &HeaderMap) -> Option<Usage> {
        let n = |name: &http::HeaderName| -> Option<u64> {
            let v: u64 = h.get(name)?.to_str().ok()?.trim().parse().ok()?;
            (v <= 1 << 53).then_some(v)
        };
        let u = Usage {
            input_tokens: n(&self.input),
            output_tokens: n(&self.output),
            total_tokens: n(&self.total),
            ..Default::default()
        };
        (u != Usage::default()).then_some(u)
    }
}

impl UsageExtractor for HeaderUsage {
    fn in_headers(&self, headers: &HeaderMap) -> Option<Usage> {
        self.read(headers)
    }

    fn in_trailers(&self, trailers: &HeaderMap) -> Option<Usage> {
        self.read(trailers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_usage_reads_integers_only() {
        let mut h = HeaderMap::new();
        h.insert("x-usage-input-tokens", "10".parse().unwrap());
        h.insert("x-usage-output-tokens", "-3".parse().unwrap());
        let u = HeaderUsage::new().in_trailers(&h).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(10), None));
        assert!(HeaderUsage::new().in_headers(&HeaderMap::new()).is_none());
        h.insert(
            "x-usage-total-tokens",
            "99999999999999999999".parse().unwrap(),
        );
        assert_eq!(
            HeaderUsage::new().in_headers(&h).unwrap().total_tokens,
            None
        );
    }
}
