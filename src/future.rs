//! The response future: reads the start of the request body when it must, asks the store,
//! then either rejects or calls the inner service and wraps its response body in the meter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::config::{Compiled, FailureMode, Mode};
use crate::key::RequestView;
use crate::layer::Shared;
use crate::request::{
    Probe, Reader, RequestBody, UNKNOWN_MODEL, inject_include_usage, max_output_tokens, model,
};
use crate::response;
use crate::service::matched;
use crate::settle::{End, Meter, Origin, Reserved, prompt_estimate};
use crate::store::{Counter, CounterStatus, Reservation, StoreFuture};
use crate::strip::UsageChunkFilter;
use crate::telemetry;

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
        /// Reading the start of the body (when needed), then waiting for the store; holds the
        /// (ready) inner service and the request.
        Checking {
            check: Option<Check>,
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

/// The store call of one admission.
enum Check {
    /// Post-debit, read at once (the store did not need to wait).
    Done(Vec<CounterStatus>),
    /// Post-debit: read the counters.
    Read(StoreFuture<Vec<CounterStatus>>),
    /// Reserve: reserve this amount on all of them.
    Reserve(StoreFuture<Reservation>, u64),
}

/// What the checking state needs to go on.
pub(crate) struct Pending<S, ReqBody> {
    pub(crate) inner: S,
    pub(crate) head: http::request::Parts,
    /// The body; `None` while `reader` holds it.
    pub(crate) body: Option<ReqBody>,
    /// Reads the start of the body first: to ask the upstream for usage, or to estimate the
    /// request's cost in reserve mode.
    pub(crate) reader: Option<Reader<ReqBody>>,
    pub(crate) shared: Arc<Shared>,
    /// The settings this request runs under, whatever reloads happen meanwhile.
    pub(crate) settings: Arc<Compiled>,
    pub(crate) counters: Arc<[Counter]>,
    pub(crate) rules: Arc<str>,
    /// The counters are found only once the body is read (rules on the model).
    pub(crate) deferred: bool,
    pub(crate) grpc: bool,
    pub(crate) request_bytes: u64,
    /// The bytes of a body of no declared length, counted as they are read.
    pub(crate) sent: Option<Arc<AtomicU64>>,
    pub(crate) strip_usage: bool,
    /// Reserve mode: the output limit the request set, and its model.
    pub(crate) max_output: Option<u64>,
    pub(crate) model: Option<String>,
    /// `token_ratelimit` span: the matched rules, then the decision.
    pub(crate) span: tracing::Span,
}

/// An admitted request: its meter and the headers to put on its response.
pub(crate) struct Admitted {
    /// Boxed: the response and its futures move through several layers by value.
    meter: Box<Meter>,
    /// The tightest counter, and which header families to describe it in (OpenAI, IETF).
    headers: Option<(Counter, CounterStatus, bool, bool)>,
    /// The layer asked for usage the client did not: remove the usage chunk from the stream.
    strip_usage: bool,
}

impl Admitted {
    fn wrap<B: Body>(mut self, response: Response<B>) -> Response<ResponseBody<B>> {
        let (mut head, body) = response.into_parts();
        if let Some((counter, status, openai, ietf)) = &self.headers {
            if *openai {
                response::insert_token_headers(&mut head.headers, counter, status);
            }
            if *ietf {
                response::insert_ietf_headers(&mut head.headers, counter, status);
            }
        }
        self.meter.on_response(&head);
        let filter =
            (self.strip_usage && self.meter.reads_plain_sse()).then(UsageChunkFilter::default);
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

    pub(crate) fn checking(pending: Pending<S, ReqBody>) -> Self {
        Self {
            state: State::Checking {
                check: None,
                pending: Some(pending),
            },
        }
    }
}

impl<S, ReqBody: RequestBody> Pending<S, ReqBody> {
    /// Once the start of the body is read: hand the inner service an equivalent body (asking
    /// for usage when the layer does that), and note what reserve mode needs. `false` when the
    /// body failed.
    fn body_read(&mut self) -> bool {
        let Some(reader) = self.reader.take() else {
            return true;
        };
        let (prefix, rest, failed) = reader.into_parts();
        if failed {
            return false;
        }
        let probe = rest.is_none().then(|| Probe::of(&prefix)).flatten();
        // A streamed body's length is known once it is read (over the limit: at least this).
        self.request_bytes = self.request_bytes.max(prefix.len() as u64);
        let settings = &self.settings;
        if settings.mode == Mode::Reserve || self.deferred {
            self.max_output = probe.as_ref().and_then(max_output_tokens);
            let unreadable = probe.is_none() && !prefix.is_empty();
            self.model = model(probe.as_ref(), self.head.uri.path())
                .or_else(|| unreadable.then(|| UNKNOWN_MODEL.to_owned()));
        }
        let injected = probe
            .as_ref()
            .filter(|_| self.strip_usage)
            .and_then(|p| inject_include_usage(&prefix, p));
        self.strip_usage = injected.is_some();
        self.body = Some(match injected {
            Some(body) => {
                // One copy of the digits (`HeaderValue::from(usize)` makes two allocations).
                if let Ok(length) = HeaderValue::from_str(itoa::Buffer::new().format(body.len())) {
                    self.head
                        .headers
                        .insert(http::header::CONTENT_LENGTH, length);
                    // The body now has a length; a message must not give both.
                    self.head.headers.remove(http::header::TRANSFER_ENCODING);
                }
                // The usage chunk asked for is removed from a plain stream only: an encoded
                // one would reach the client with it. `identity` is always acceptable.
                self.head.headers.insert(
                    http::header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
                ReqBody::rebuild(body, None)
            }
            None => ReqBody::rebuild(prefix, rest),
        });
        true
    }

    fn prompt_tokens(&self) -> u64 {
        prompt_estimate(self.request_bytes)
    }

    /// The store call: a read, or in reserve mode a reservation of the estimated cost.
    fn check(&self) -> Check {
        let store = &self.shared.store;
        match self.settings.mode {
            Mode::PostDebit => match store.try_check_now(&self.counters) {
                Some(statuses) => Check::Done(statuses),
                None => Check::Read(store.check(&self.counters)),
            },
            Mode::Reserve => {
                let output = self.max_output.unwrap_or_else(|| {
                    self.shared.allowances.get(
                        &self.rules,
                        self.model.as_deref(),
                        self.settings.default_output_tokens,
                    )
                });
                let amount = self.prompt_tokens().saturating_add(output);
                Check::Reserve(store.reserve(&self.counters, amount), amount)
            }
        }
    }
}

/// What the store said.
enum Decision {
    Admit {
        statuses: Option<Vec<CounterStatus>>,
        reserved: Option<(Vec<u64>, u64, bool)>,
    },
    Reject(Vec<CounterStatus>, u64),
    Unavailable,
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
                    if let Some(reader) = p.reader.as_mut() {
                        ready!(reader.poll_read(cx));
                        if !p.body_read() {
                            this.state.set(State::Rejected {
                                response: Some(response::unreadable_body()),
                            });
                            continue;
                        }
                    }
                    if std::mem::take(&mut p.deferred) {
                        let view = RequestView::from_parts(&p.head);
                        match matched(&p.settings.rules, &view, p.model.as_deref()) {
                            Some((counters, rules)) => {
                                p.span.record("rules", &*rules);
                                (p.counters, p.rules) = (counters, rules);
                            }
                            None => {
                                let p = pending.take().expect("pending");
                                let request = Request::from_parts(
                                    p.head,
                                    p.body.expect("body back from the reader"),
                                );
                                let mut inner = p.inner;
                                this.state.set(State::Calling {
                                    future: inner.call(request),
                                    admitted: None,
                                });
                                continue;
                            }
                        }
                    }
                    let check = check.get_or_insert_with(|| p.check());
                    let decision = match check {
                        Check::Done(statuses) => decide(p, Some(std::mem::take(statuses)), None, 0),
                        Check::Read(f) => match ready!(f.as_mut().poll(cx)) {
                            Ok(statuses) => decide(p, Some(statuses), None, 0),
                            Err(e) => {
                                tracing::warn!(error = %e, rules = &*p.rules, "token rate limit store unavailable");
                                decide(p, None, None, 0)
                            }
                        },
                        Check::Reserve(f, amount) => match ready!(f.as_mut().poll(cx)) {
                            Ok(r) => decide(p, Some(r.statuses), Some(r.windows), *amount),
                            Err(e) => {
                                tracing::warn!(error = %e, rules = &*p.rules, "token rate limit store unavailable");
                                decide(p, None, None, *amount)
                            }
                        },
                    };
                    let p = pending.take().expect("polled after completion");
                    let settings = &p.settings;
                    let label = match &decision {
                        Decision::Reject(..) => "rejected",
                        Decision::Unavailable => "failed_closed",
                        Decision::Admit { statuses: None, .. } => "failed_open",
                        Decision::Admit { .. } => "allowed",
                    };
                    p.span.record("decision", label);
                    telemetry::request(&p.rules, label);
                    let (statuses, reserved) = match decision {
                        Decision::Reject(statuses, amount) => {
                            tracing::debug!(
                                rules = &*p.rules,
                                "request rejected: token budget spent"
                            );
                            let response = response::rejection(
                                settings,
                                p.grpc,
                                &p.counters,
                                &statuses,
                                amount,
                            );
                            this.state.set(State::Rejected {
                                response: Some(response),
                            });
                            continue;
                        }
                        Decision::Unavailable => {
                            this.state.set(State::Rejected {
                                response: Some(response::store_unavailable(p.grpc)),
                            });
                            continue;
                        }
                        Decision::Admit { statuses, reserved } => (statuses, reserved),
                    };
                    // The budget left counts this request's own reservation (SPEC 4); the
                    // store answers with the counters as they were before it.
                    let mut statuses = statuses;
                    if let (Some(statuses), Some((_, amount, _))) = (&mut statuses, &reserved) {
                        for s in statuses.iter_mut() {
                            s.used = s.used.saturating_add(*amount);
                        }
                    }
                    let headers = statuses
                        .as_deref()
                        .filter(|_| settings.openai_headers || settings.ietf_headers)
                        .and_then(|s| response::tightest(&p.counters, s))
                        .map(|(c, s)| {
                            (
                                c.clone(),
                                *s,
                                settings.openai_headers,
                                settings.ietf_headers,
                            )
                        });
                    let prompt = p.prompt_tokens();
                    let reservation = reserved.map(|(windows, amount, local)| Reserved {
                        windows,
                        amount,
                        local,
                        prompt,
                        model: p.model.as_deref().map(Arc::from),
                        learns: p.max_output.is_none(),
                    });
                    let origin = Origin {
                        rules: p.rules,
                        model: p.model.as_deref().map(Arc::from),
                        span: p.span,
                    };
                    let meter = Box::new(Meter::new(
                        p.shared.clone(),
                        settings.cost,
                        p.counters,
                        origin,
                        reservation,
                        p.request_bytes,
                        p.sent,
                    ));
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

/// Turns the store's answer (or its failure: `statuses` is `None`) into a decision, applying
/// the failure mode. `windows` is the reserve answer: `Some(None)` when refused.
fn decide<S, B>(
    p: &Pending<S, B>,
    statuses: Option<Vec<CounterStatus>>,
    windows: Option<Option<Vec<u64>>>,
    amount: u64,
) -> Decision {
    let settings = &p.settings;
    let Some(statuses) = statuses.filter(|s| s.len() == p.counters.len()) else {
        return match (settings.failure_mode, &p.shared.fallback) {
            (FailureMode::Closed, _) => Decision::Unavailable,
            (FailureMode::Local, Some(local)) => match settings.mode {
                Mode::PostDebit => decide(p, Some(local.check_now(&p.counters)), None, 0),
                Mode::Reserve => {
                    let r = local.reserve_now(&p.counters, amount);
                    match r.windows {
                        Some(w) => Decision::Admit {
                            statuses: Some(r.statuses),
                            reserved: Some((w, amount, true)),
                        },
                        None => Decision::Reject(r.statuses, amount),
                    }
                }
            },
            _ => Decision::Admit {
                statuses: None,
                reserved: None,
            },
        };
    };
    match windows {
        None if statuses
            .iter()
            .zip(p.counters.iter())
            .any(|(s, c)| s.used >= c.limit) =>
        {
            Decision::Reject(statuses, 0)
        }
        None => Decision::Admit {
            statuses: Some(statuses),
            reserved: None,
        },
        Some(None) => Decision::Reject(statuses, amount),
        Some(Some(w)) => Decision::Admit {
            statuses: Some(statuses),
            reserved: Some((w, amount, false)),
        },
    }
}
