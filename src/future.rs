//! The response future: waits for the store's answer, then either rejects or calls the inner
//! service and wraps its response body in the meter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::config::FailureMode;
use crate::layer::Shared;
use crate::request::{Reader, RequestBody, inject_include_usage};
use crate::response;
use crate::settle::{End, Meter};
use crate::store::{Counter, CounterStatus, StoreFuture};
use crate::strip::UsageChunkFilter;

pin_project! {
    /// Response future of [`TokenRateLimit`](crate::TokenRateLimit).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody, S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, F> {
        /// Waiting for the store; holds the (ready) inner service and the request.
        Checking {
            check: StoreFuture<Vec<CounterStatus>>,
            pending: Option<Pending<S, ReqBody>>,
        },
        /// Waiting for the inner service.
        Calling {
            #[pin]
            future: F,
            admitted: Option<Admitted>,
        },
        /// Rejected without calling the inner service.
        Rejected {
            response: Option<Response<bytes::Bytes>>,
        },
    }
}

/// What the checking state needs to go on.
pub(crate) struct Pending<S, ReqBody> {
    pub(crate) inner: S,
    pub(crate) head: http::request::Parts,
    /// The body; `None` while `reader` holds it.
    pub(crate) body: Option<ReqBody>,
    /// Reads the start of the body first, to ask the upstream for usage.
    pub(crate) reader: Option<Reader<ReqBody>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) counters: Arc<[Counter]>,
    pub(crate) rules: Arc<str>,
    pub(crate) grpc: bool,
    pub(crate) request_bytes: u64,
    pub(crate) strip_usage: bool,
}

/// An admitted request: its meter and the headers to put on its response.
pub(crate) struct Admitted {
    meter: Meter,
    headers: Option<(Counter, CounterStatus)>,
    /// The layer asked for usage the client did not: remove the usage chunk from the stream.
    strip_usage: bool,
}

impl Admitted {
    fn wrap<B: Body>(mut self, response: Response<B>) -> Response<ResponseBody<B>> {
        let (mut head, body) = response.into_parts();
        if let Some((counter, status)) = &self.headers {
            response::insert_token_headers(&mut head.headers, counter, status);
        }
        self.meter.on_response(&head);
        let sse = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let filter =
            (self.strip_usage && sse && !head.headers.contains_key(http::header::CONTENT_ENCODING))
                .then(UsageChunkFilter::default);
        if filter.is_some() {
            head.headers.remove(http::header::CONTENT_LENGTH);
        }
        Response::from_parts(head, ResponseBody::inner(body, Some(self.meter), filter))
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// A request no limit applies to.
    pub(crate) fn unmetered(future: S::Future) -> Self {
        Self {
            state: State::Calling {
                future,
                admitted: None,
            },
        }
    }

    pub(crate) fn checking(
        check: StoreFuture<Vec<CounterStatus>>,
        pending: Pending<S, ReqBody>,
    ) -> Self {
        Self {
            state: State::Checking {
                check,
                pending: Some(pending),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: RequestBody,
    ResBody: Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { check, pending } => {
                    let p = pending.as_mut().expect("polled after completion");
                    let mut strip_usage = false;
                    if let Some(reader) = p.reader.as_mut() {
                        ready!(reader.poll_read(cx));
                        let (prefix, rest, failed) = p.reader.take().expect("reading").into_parts();
                        if failed {
                            this.state.set(State::Rejected {
                                response: Some(response::unreadable_body()),
                            });
                            continue;
                        }
                        let injected = rest
                            .is_none()
                            .then(|| inject_include_usage(&prefix))
                            .flatten();
                        p.body = Some(match injected {
                            Some(body) => {
                                strip_usage = true;
                                p.head
                                    .headers
                                    .insert(http::header::CONTENT_LENGTH, body.len().into());
                                ReqBody::rebuild(body, None)
                            }
                            None => ReqBody::rebuild(prefix, rest),
                        });
                        p.strip_usage = strip_usage;
                    }
                    let result = ready!(check.as_mut().poll(cx));
                    let p = pending.take().expect("polled after completion");
                    let statuses = match result {
                        Ok(statuses) if statuses.len() == p.counters.len() => Some(statuses),
                        Ok(statuses) => {
                            tracing::error!(
                                expected = p.counters.len(),
                                got = statuses.len(),
                                "store answered for the wrong number of counters; admitting"
                            );
                            None
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, rules = &*p.rules, "token rate limit store unavailable");
                            None
                        }
                    };
                    let settings = &p.shared.compiled;
                    let statuses = match (statuses, settings.failure_mode, &p.shared.fallback) {
                        (Some(s), _, _) => Some(s),
                        (None, FailureMode::Local, Some(local)) => {
                            Some(local.check_now(&p.counters))
                        }
                        (None, FailureMode::Closed, _) => {
                            let response = response::store_unavailable(p.grpc);
                            this.state.set(State::Rejected {
                                response: Some(response),
                            });
                            continue;
                        }
                        (None, _, _) => None,
                    };
                    if let Some(statuses) = &statuses
                        && statuses
                            .iter()
                            .zip(p.counters.iter())
                            .any(|(s, c)| s.used >= c.limit)
                    {
                        tracing::debug!(rules = &*p.rules, "request rejected: token budget spent");
                        let response = response::rejection(settings, p.grpc, &p.counters, statuses);
                        this.state.set(State::Rejected {
                            response: Some(response),
                        });
                        continue;
                    }
                    let headers = statuses
                        .as_deref()
                        .filter(|_| settings.openai_headers)
                        .and_then(|s| response::tightest(&p.counters, s))
                        .map(|(c, s)| (c.clone(), *s));
                    let meter = Meter::new(
                        p.shared.settler().clone(),
                        p.counters,
                        p.rules,
                        settings.cost,
                        p.shared.extractor.clone(),
                        p.request_bytes,
                    );
                    let mut inner = p.inner;
                    let request =
                        Request::from_parts(p.head, p.body.expect("body back from the reader"));
                    let future = inner.call(request);
                    this.state.set(State::Calling {
                        future,
                        admitted: Some(Admitted {
                            meter,
                            headers,
                            strip_usage: p.strip_usage,
                        }),
                    });
                }
                StateProj::Calling { future, admitted } => {
                    let result = ready!(future.poll(cx));
                    return Poll::Ready(match result {
                        Ok(response) => Ok(match admitted.take() {
                            Some(a) => a.wrap(response),
                            None => response.map(|b| ResponseBody::inner(b, None, None)),
                        }),
                        Err(e) => {
                            if let Some(mut a) = admitted.take() {
                                a.meter.settle(End::ServiceError);
                            }
                            Err(e)
                        }
                    });
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::rejected)));
                }
            }
        }
    }
}
