//! The middleware service.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::config::Mode;
use crate::future::{Pending, ResponseFuture};
use crate::key::RequestView;
use crate::layer::Shared;
use crate::request::{Reader, RequestBody, UNKNOWN_MODEL, model};
use crate::store::Counter;

/// Token rate limiting around a service; made by [`TokenRateLimitLayer`](crate::TokenRateLimitLayer).
///
/// It never returns an error of its own: a rejection is a response (429 or gRPC
/// `RESOURCE_EXHAUSTED`), and a store failure applies the failure mode.
#[derive(Clone)]
pub struct TokenRateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> TokenRateLimit<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> std::fmt::Debug for TokenRateLimit<S>
where
    S: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for TokenRateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: RequestBody,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let settings = self.shared.compiled.load_full();
        let rules = &settings.rules;
        // Rules on the model can only be matched once the body has been read.
        let deferred = rules.needs_model();
        let (counters, names) = if deferred {
            (Arc::from([]), Arc::from(""))
        } else {
            match matched(rules, &RequestView::new(&request), None) {
                Some(m) => m,
                None => return ResponseFuture::unmetered(self.inner.call(request)),
            }
        };
        let headers = request.headers();
        let content_type = headers.get(CONTENT_TYPE).map(http::HeaderValue::as_bytes);
        let grpc = content_type.is_some_and(|v| v.starts_with(b"application/grpc"));
        let json = is_json(content_type) && !headers.contains_key(CONTENT_ENCODING);
        let content_length: Option<u64> = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let declared = content_length.or_else(|| request.body().size_hint().exact());
        let request_bytes = declared.unwrap_or_else(|| request.body().size_hint().lower());
        // A body of no declared length (chunked, or HTTP/2 without `content-length`) is
        // counted as it is read (by the layer, then the inner service), for the prompt
        // estimate.
        let sent = declared.is_none().then(|| Arc::new(AtomicU64::new(0)));
        let fits = content_length.is_none_or(|n| n <= settings.request_body_limit as u64);
        let inject = settings.inject_include_usage && json && fits && may_ask_for_usage(&request);
        let reserve = settings.mode == Mode::Reserve;
        let read = inject || ((reserve || deferred) && fits && json);
        // Without reading the body, a Gemini path still names the model; a body left unread
        // has an unknown one.
        let has_body = content_length.map_or(!request.body().is_end_stream(), |n| n > 0);
        let model = (reserve || deferred)
            .then(|| {
                model(None, request.uri().path())
                    .or_else(|| (!read && has_body).then(|| UNKNOWN_MODEL.to_owned()))
            })
            .flatten();
        let (head, body) = request.into_parts();
        let body = match &sent {
            Some(sent) => body.counted(sent.clone()),
            None => body,
        };
        let (body, reader) = if read {
            (None, Some(Reader::new(body, settings.request_body_limit)))
        } else {
            (Some(body), None)
        };

        let span = tracing::debug_span!(
            "token_ratelimit",
            rules = &*names,
            decision = tracing::field::Empty
        );
        // The ready service goes with the future; this one keeps a clone to drive readiness.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(Pending {
            inner,
            head,
            body,
            reader,
            shared: self.shared.clone(),
            settings,
            counters,
            rules: names,
            deferred,
            grpc,
            request_bytes,
            sent,
            strip_usage: inject,
            max_output: None,
            model,
            span,
        })
    }
}

/// A JSON content type, or none (clients often send JSON without one).
fn is_json(content_type: Option<&[u8]>) -> bool {
    content_type.is_none_or(|v| v.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")))
}

/// A `POST` to an OpenAI chat or legacy completions endpoint (with an uncompressed JSON body,
/// checked by the caller): its body may ask for a stream without usage.
fn may_ask_for_usage<B>(request: &Request<B>) -> bool {
    let path = crate::request::normalized_path(request.uri().path());
    let path = path.trim_end_matches('/');
    request.method() == http::Method::POST
        && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
}

/// The counters a request falls under and the rules they come from, or `None`.
pub(crate) fn matched(
    rules: &crate::rule::Rules,
    view: &RequestView<'_>,
    model: Option<&str>,
) -> Option<(Arc<[Counter]>, Arc<str>)> {
    let matched = rules.counters(view, model);
    if matched.is_empty() {
        return None;
    }
    let first = &matched[0].rule;
    let names = if matched.iter().all(|m| Arc::ptr_eq(&m.rule, first)) {
        first.clone()
    } else {
        let mut names: Vec<&str> = matched.iter().map(|m| &*m.rule).collect();
        names.dedup();
        names.join(",").into()
    };
    Some((matched.into_iter().map(|m| m.counter).collect(), names))
}
