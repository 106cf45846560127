//! Reading (a bounded prefix of) the request body before the inner service sees it, and
//! handing the inner service an equivalent body: for `stream_options.include_usage`
//! (SPEC 3.4).

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::de::{IgnoredAny, MapAccess};
use serde_json::value::RawValue;

use crate::usage::BOM;
use crate::usage::wire::{Lenient, deserialize_lenient};

/// A request body type the layer can rebuild after reading the start of it.
///
/// The layer reads a bounded prefix of some request bodies (streaming OpenAI chat requests, to
/// ask for usage) and must then give the inner service a body of the same type: the prefix
/// (possibly rewritten) followed by the rest of the original. Implemented for
/// `axum::body::Body`, `http_body_util::Full<Bytes>` and the boxed bodies of `http-body-util`;
/// for another type, wrap it in one of those.
pub trait RequestBody: Body<Data = Bytes> + Unpin + Sized + Send + 'static {
    /// A body yielding `prefix`, then what is left of `rest`.
    fn rebuild(prefix: Bytes, rest: Option<Self>) -> Self;

    /// This body, adding the bytes it yields to `sent`. The layer counts a body whose length
    /// is not declared (chunked, or HTTP/2 without `content-length`) as it is read, so that a
    /// request that gets no usage back is charged its prompt estimate all the same. The
    /// default gives the body back uncounted (the estimate then counts what the layer read of
    /// it, if anything).
    fn counted(self, sent: Arc<AtomicU64>) -> Self {
        let _ = sent;
        self
    }
}

pin_project! {
    /// A body that adds the bytes it yields to a count (see [`RequestBody::counted`]).
    pub(crate) struct Counted<B> {
        #[pin]
        body: B,
        sent: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub(crate) fn new(body: B, sent: Arc<AtomicU64>) -> Self {
        Self { body, sent }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// `prefix`, then the rest of a body.
    pub(crate) struct Prefixed<B> {
        prefix: Option<Bytes>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B> Prefixed<B> {
    pub(crate) fn new(prefix: Bytes, rest: Option<B>) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match this.rest.as_pin_mut() {
            Some(rest) => rest.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        hint.set_lower(hint.lower() + prefix);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + prefix);
        }
        hint
    }
}

#[cfg(feature = "axum")]
impl RequestBody for axum::body::Body {
    fn rebuild(prefix: Bytes, rest: Option<Self>) -> Self {
        match rest {
            None => Self::from(prefix),
            Some(rest) => Self::new(Prefixed::new(prefix, Some(rest))),
        }
    }

    fn counted(self, sent: Arc<AtomicU64>) -> Self {
        Self::new(Counted::new(self, sent))
    }
}

#[cfg(feature = "tonic")]
impl RequestBody for tonic::body::Body {
    fn rebuild(prefix: Bytes, rest: Option<Self>) -> Self {
        Self::new(Prefixed::new(prefix, rest))
    }

    fn counted(self, sent: Arc<AtomicU64>) -> Self {
        Self::new(Counted::new(self, sent))
    }
}

impl RequestBody for http_body_util::Full<Bytes> {
    fn rebuild(prefix: Bytes, _rest: Option<Self>) -> Self {
        // A `Full` body is read whole or not at all: there is never a rest.
        Self::new(prefix)
    }
}

impl<E> RequestBody for http_body_util::combinators::BoxBody<Bytes, E>
where
    E: 'static,
{
    fn rebuild(prefix: Bytes, rest: Option<Self>) -> Self {
        Self::new(Prefixed::new(prefix, rest))
    }

    fn counted(self, sent: Arc<AtomicU64>) -> Self {
        Self::new(Counted::new(self, sent))
    }
}

impl<E> RequestBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E>
where
    E: 'static,
{
    fn rebuild(prefix: Bytes, rest: Option<Self>) -> Self {
        Self::new(Prefixed::new(prefix, rest))
    }

    fn counted(self, sent: Arc<AtomicU64>) -> Self {
        Self::new(Counted::new(self, sent))
    }
}

/// Reads at most `limit` bytes of a body (a whole frame may take it past the limit).
pub(crate) struct Reader<B> {
    body: Option<B>,
    /// The first frame, kept as it came while it is the only one (no copy).
    first: Bytes,
    /// Every frame, once there is more than one.
    buf: bytes::BytesMut,
    limit: usize,
    failed: bool,
}

impl<B: RequestBody> Reader<B> {
    pub(crate) fn new(body: B, limit: usize) -> Self {
        Self {
            body: Some(body),
            first: Bytes::new(),
            buf: bytes::BytesMut::new(),
            limit,
            failed: false,
        }
    }

    /// Ready when the body has ended, the limit is passed, or the body failed.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(());
            };
            if body.is_end_stream() {
                self.body = None;
                return Poll::Ready(());
            }
            match std::task::ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if self.first.is_empty() && self.buf.is_empty() {
                            self.first = data;
                        } else {
                            if !self.first.is_empty() {
                                self.buf.extend_from_slice(&std::mem::take(&mut self.first));
                            }
                            self.buf.extend_from_slice(&data);
                        }
                        if self.first.len() + self.buf.len() > self.limit {
                            return Poll::Ready(());
                        }
                    }
                    // Request trailers are not forwarded by servers that buffer either; stop.
                    Err(_) => {
                        self.body = None;
                        return Poll::Ready(());
                    }
                },
                Some(Err(_)) => {
                    self.failed = true;
                    self.body = None;
                    return Poll::Ready(());
                }
                None => {
                    self.body = None;
                    return Poll::Ready(());
                }
            }
        }
    }

    /// `(what was read, the rest of the body if it did not end, whether reading failed)`.
    pub(crate) fn into_parts(self) -> (Bytes, Option<B>, bool) {
        let read = if self.buf.is_empty() {
            self.first
        } else {
            self.buf.freeze()
        };
        (read, self.body, self.failed)
    }
}

/// The fields of a request body the layer looks at. Everything else is skipped by the parser
/// without being built, so a large prompt costs a scan, not a tree. A field given twice counts
/// with its last value, as the upstream's parser reads it (Python's, Go's and JavaScript's
/// do): a repeated `model` must not make the request unreadable, or slip past a rule on the
/// model with another name.
#[derive(Debug, Default)]
pub(crate) struct Probe<'a> {
    stream: Option<Seen<'a>>,
    /// As written: what the include_usage rewrite replaces, leaving the rest of the body as
    /// the client wrote it.
    stream_options: Option<&'a RawValue>,
    model: Option<Seen<'a>>,
    max_tokens: Option<Seen<'a>>,
    max_completion_tokens: Option<Seen<'a>>,
    max_output_tokens: Option<Seen<'a>>,
    /// `generationConfig`.
    generation_config: Option<Seen<'a>>,
}

impl<'a> Probe<'a> {
    /// The probe of a JSON object body; `None` for anything else. A UTF-8 byte order mark
    /// before it is skipped, as Python's `json.loads` (FastAPI, vLLM, LiteLLM) skips it.
    pub(crate) fn of(body: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(body.strip_prefix(BOM).unwrap_or(body)).ok()
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Probe<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<Probe<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Probe<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe<'a>, A::Error> {
                let mut p = Probe::default();
                while let Some(Key(key)) = map.next_key()? {
                    let field = match &*key {
                        "stream" => &mut p.stream,
                        "stream_options" => {
                            p.stream_options = Some(map.next_value()?);
                            continue;
                        }
                        "model" => &mut p.model,
                        "max_tokens" => &mut p.max_tokens,
                        "max_completion_tokens" => &mut p.max_completion_tokens,
                        "max_output_tokens" => &mut p.max_output_tokens,
                        "generationConfig" => &mut p.generation_config,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *field = map.next_value()?;
                }
                Ok(p)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// An object's key, borrowed from the body unless it holds escapes (serde's own `Cow<str>` is
/// always an owned copy: one allocation per key).
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// What the probe keeps of a field's value: its shape, and the scalars it may read. An
/// object keeps only the members the layer reads inside one (`include_usage`,
/// `maxOutputTokens`); anything else is skipped unbuilt.
#[derive(Debug, Clone, Default, PartialEq)]
enum Seen<'a> {
    Bool(bool),
    Count(u64),
    /// A string, borrowed unless it has escapes.
    Str(Cow<'a, str>),
    Object {
        include_usage: Option<bool>,
        max_output_tokens: Option<u64>,
    },
    #[default]
    Other,
}

impl Seen<'_> {
    fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn as_count(&self) -> Option<u64> {
        match *self {
            Self::Count(n) => Some(n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Lenient<'de> for Seen<'a> {
    fn on_bool(value: bool) -> Self {
        Self::Bool(value)
    }

    fn on_u64(value: u64) -> Self {
        Self::Count(value)
    }

    fn on_str(value: &str) -> Self {
        Self::Str(Cow::Owned(value.to_owned()))
    }

    fn on_borrowed_str(value: &'de str) -> Self {
        Self::Str(Cow::Borrowed(value))
    }

    fn on_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let (mut include_usage, mut max_output_tokens) = (None, None);
        while let Some(Key(key)) = map.next_key()? {
            match &*key {
                "include_usage" => include_usage = map.next_value::<Seen<'de>>()?.as_bool(),
                "maxOutputTokens" => max_output_tokens = map.next_value::<Seen<'de>>()?.as_count(),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Self::Object {
            include_usage,
            max_output_tokens,
        })
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Seen<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_lenient(d)
    }
}

/// For a streaming OpenAI chat / completions body that did not ask for usage, the body
/// rewritten to ask for it. `None`: leave the body as it is.
pub(crate) fn inject_include_usage(body: &[u8], probe: &Probe<'_>) -> Option<Bytes> {
    if probe.stream.as_ref().and_then(Seen::as_bool) != Some(true) {
        return None;
    }
    let Some(raw) = probe.stream_options else {
        // The usual case: add the field before the object's closing brace, leaving every
        // other byte as the client wrote it.
        let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
        return (body[end] == b'}').then(|| {
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..end]);
            out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
            out.extend_from_slice(&body[end..]);
            Bytes::from(out)
        });
    };
    // Given: its value alone is replaced, however deep the rest of the body nests. `null`
    // (which OpenAI's schema allows) is replaced, not followed by a second `stream_options`
    // that parsers refusing duplicate keys would refuse; anything but an object is left.
    let options: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(raw.get()).ok()?;
    let mut options = options.unwrap_or_default();
    if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let replacement = serde_json::to_vec(&options).ok()?;
    // The value's place in the body it was read from.
    let (text, within) = (raw.get().as_bytes().as_ptr_range(), body.as_ptr_range());
    if text.start < within.start || text.end > within.end {
        return None;
    }
    let start = text.start as usize - within.start as usize;
    let (before, after) = (&body[..start], &body[start + raw.get().len()..]);
    let mut out = Vec::with_capacity(body.len() + replacement.len());
    out.extend_from_slice(before);
    out.extend_from_slice(&replacement);
    out.extend_from_slice(after);
    Some(Bytes::from(out))
}

/// The output limit a request sets: `max_tokens` (OpenAI chat and Anthropic),
/// `max_completion_tokens`, `max_output_tokens` (Responses API), or Gemini's
/// `generationConfig.maxOutputTokens`.
pub(crate) fn max_output_tokens(probe: &Probe<'_>) -> Option<u64> {
    [
        &probe.max_completion_tokens,
        &probe.max_tokens,
        &probe.max_output_tokens,
    ]
    .into_iter()
    .find_map(|v| v.as_ref()?.as_count())
    .or_else(|| match probe.generation_config.as_ref()? {
        Seen::Object {
            max_output_tokens, ..
        } => *max_output_tokens,
        _ => None,
    })
}

/// A request path as an upstream routes it: percent-escapes decoded, empty segments and `.`
/// removed, `..` applied. Rules on paths, and what the layer reads from a path, see this, so
/// that `/v1/chat/%63ompletions` or `/v1//chat/completions` is no way around a limit on
/// `/v1/chat/completions`. Borrowed when there is nothing to change.
pub(crate) fn normalized_path(path: &str) -> Cow<'_, str> {
    let plain = !path.contains('%') && !path.contains("//") && !path.contains("/.");
    if plain {
        return Cow::Borrowed(path);
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    // A trailing `/` (or `/.`, `/..`) keeps the path a directory.
    if segments.is_empty()
        || decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        out.push('/');
    }
    Cow::Owned(out)
}

/// The model of a request that has a body the layer could not read as a JSON object (over
/// `request_body_limit`, compressed, not JSON): rules on the model count it under this name,
/// rather than letting it pass unlimited.
pub(crate) const UNKNOWN_MODEL: &str = "unknown";

/// The model a request names: its JSON `model`, or Gemini's path `…/models/{model}:method`.
pub(crate) fn model(probe: Option<&Probe<'_>>, path: &str) -> Option<String> {
    if let Some(Seen::Str(m)) = probe.and_then(|p| p.model.as_ref()) {
        return Some(m.as_ref().to_owned());
    }
    let path = normalized_path(path);
    let rest = &path[path.find("/models/")? + "/models/".len()..];
    let model = rest.split([':', '/']).next()?;
    (!model.is_empty()).then(|| model.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject_include_usage(body: &[u8]) -> Option<Bytes> {
        super::inject_include_usage(body, &Probe::of(body)?)
    }

    #[test]
    fn output_limits_and_models() {
        let v = Probe::of(br#"{"model": "gpt-4o", "max_completion_tokens": 50, "max_tokens": 9}"#)
            .unwrap();
        assert_eq!(max_output_tokens(&v), Some(50));
        let g = Probe::of(br#"{"generationConfig": {"maxOutputTokens": 77}}"#).unwrap();
        assert_eq!(max_output_tokens(&g), Some(77));
        assert_eq!(
            model(Some(&v), "/v1/chat/completions").as_deref(),
            Some("gpt-4o")
        );
        let path = "/v1beta/models/gemini-2.5-pro:streamGenerateContent";
        assert_eq!(model(Some(&g), path).as_deref(), Some("gemini-2.5-pro"));
        let bom = Probe::of(b"\xEF\xBB\xBF{\"model\":\"gpt-4o\"}").unwrap();
        assert_eq!(
            model(Some(&bom), "/v1/chat/completions").as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(model(None, "/v1/chat"), None);
        // A field given twice counts with its last value, as upstreams read it.
        let twice = Probe::of(br#"{"model": "a", "max_tokens": 1, "model": "b", "max_tokens": 2}"#)
            .unwrap();
        assert_eq!(model(Some(&twice), "/v1/chat").as_deref(), Some("b"));
        assert_eq!(max_output_tokens(&twice), Some(2));
        // An escaped name is the name (it must not slip past a rule on the model).
        let escaped = Probe::of(br#"{"model": "gpt\u002d4o", "max_tokens": 5.0}"#).unwrap();
        assert_eq!(model(Some(&escaped), "/v1/chat").as_deref(), Some("gpt-4o"));
        assert_eq!(max_output_tokens(&escaped), None);
        // So is an escaped key, at the top and inside an object (keys are borrowed from the
        // body unless they hold escapes).
        let keys = Probe::of(
            br#"{"mod\u0065l": "m", "max_\u0074okens": 3, "generationConfig": {"maxOutputT\u006fkens": 8}}"#,
        )
        .unwrap();
        assert_eq!(model(Some(&keys), "/v1/chat").as_deref(), Some("m"));
        assert_eq!(keys.max_tokens.as_ref().and_then(Seen::as_count), Some(3));
        assert_eq!(
            keys.generation_config,
            Some(Seen::Object {
                include_usage: None,
                max_output_tokens: Some(8)
            })
        );
        let odd = Probe::of(
            br#"{"model": 7, "max_tokens": -1, "stream": "yes", "generationConfig": [1]}"#,
        )
        .unwrap();
        assert_eq!(model(Some(&odd), "/v1/chat"), None);
        assert_eq!(max_output_tokens(&odd), None);
    }

    #[test]
    fn paths_are_normalized_as_upstreams_route_them() {
        for (path, want) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/%63ompletions", "/v1/chat/completions"),
            ("/v1//chat/completions", "/v1/chat/completions"),
            ("/v1/./chat/completions", "/v1/chat/completions"),
            ("/v1/embeddings/../chat/completions", "/v1/chat/completions"),
            ("/../../v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat%2Fcompletions", "/v1/chat/completions"),
            ("/v1/models/", "/v1/models/"),
            ("/v1/models/.", "/v1/models/"),
            ("/v1/x/..", "/v1/"),
            ("/", "/"),
            ("/%2e%2e", "/"),
        ] {
            assert_eq!(normalized_path(path), want, "{path}");
        }
        assert!(matches!(normalized_path("/v1/a.b/c"), Cow::Borrowed(_)));
        assert_eq!(
            model(
                None,
                "/v1beta/models/gemini%2D2.5-pro:streamGenerateContent"
            )
            .as_deref(),
            Some("gemini-2.5-pro")
        );
    }

    #[test]
    fn injects_only_into_streaming_requests_without_usage() {
        let out = inject_include_usage(br#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        assert_eq!(
            &out[..],
            br#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#
        );
        // Formatting outside the new field is kept.
        let out = inject_include_usage(b"{ \"stream\" : true }\n").unwrap();
        assert_eq!(
            &out[..],
            b"{ \"stream\" : true ,\"stream_options\":{\"include_usage\":true}}\n"
        );
        let out = inject_include_usage(
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            br#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#
        );
        assert!(
            inject_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        assert!(inject_include_usage(br#"{"stream":false}"#).is_none());
        // Escaped keys are the fields they name.
        assert!(inject_include_usage(br#"{"str\u0065am":true}"#).is_some());
        assert!(
            inject_include_usage(
                br#"{"stream":true,"stream_\u006fptions":{"include_\u0075sage":true}}"#
            )
            .is_none()
        );
        assert!(inject_include_usage(br#"{"model":"m"}"#).is_none());
        assert!(inject_include_usage(br#"{"stream":true,"stream_options":5}"#).is_none());
        // `null` (OpenAI's schema allows it) is replaced, not followed by a second key.
        let out =
            inject_include_usage(br#"{"stream":true, "stream_options" : null ,"n":1}"#).unwrap();
        assert_eq!(
            &out[..],
            br#"{"stream":true, "stream_options" : {"include_usage":true} ,"n":1}"#
        );
        // Given twice, the last is the one read and replaced.
        let out = inject_include_usage(
            br#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":{}}"#,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            br#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":true}}"#
        );
        // However deep the rest of the body nests (past serde_json's 128 levels), only the
        // value of `stream_options` is rewritten.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let body = format!(
            r#"{{"stream":true,"stream_options":{{"include_usage":false}},"tools":{deep}}}"#
        );
        let out = inject_include_usage(body.as_bytes()).unwrap();
        assert_eq!(
            &out[..],
            body.replace("false", "true").as_bytes(),
            "the upstream is asked for usage"
        );
        // A byte order mark before the object is read past, and kept.
        let out = inject_include_usage(b"\xEF\xBB\xBF{\"stream\":true}").unwrap();
        assert_eq!(
            &out[..],
            b"\xEF\xBB\xBF{\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
        );
        let out = inject_include_usage(
            b"\xEF\xBB\xBF{\"stream\":true,\"stream_options\":{\"include_usage\":false}}",
        )
        .unwrap();
        assert_eq!(
            &out[..],
            b"\xEF\xBB\xBF{\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
        );
        assert!(inject_include_usage(b"not json").is_none());
        assert!(inject_include_usage(b"[1,2]").is_none());
    }
}
