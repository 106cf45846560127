//! The response body: a rejection, or the upstream body passed through frame by frame while a
//! meter reads the token usage it reports.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::settle::{End, Meter};
use crate::strip::UsageChunkFilter;

pin_project! {
    /// Response body of [`TokenRateLimit`](crate::TokenRateLimit): either the inner service's
    /// body, unchanged and unbuffered (metered when the request matched a limit), or the body of
    /// a rejection.
    ///
    /// When the body ends — at its last frame, on an error, or when it is dropped because the
    /// client went away — the request is settled exactly once.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            meter: Option<Box<Meter>>,
            // Removes the usage chunk the layer asked for on the client's behalf.
            filter: Option<UsageChunkFilter>,
            ended: bool,
        },
        Rejected {
            body: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(
        body: B,
        mut meter: Option<Box<Meter>>,
        filter: Option<UsageChunkFilter>,
    ) -> Self
    where
        B: Body,
    {
        if body.is_end_stream() {
            // An empty body is never polled: it is complete as it stands.
            if let Some(m) = meter.as_mut() {
                m.settle(End::Complete);
            }
        }
        Self {
            kind: Kind::Inner {
                body,
                meter,
                filter,
                ended: false,
            },
        }
    }

    pub(crate) fn rejected(body: Bytes) -> Self {
        Self {
            // An empty body (gRPC's) is none: HTTP/2 then ends the stream with the headers,
            // the trailers-only response gRPC clients read the status from.
            kind: Kind::Rejected {
                body: (!body.is_empty()).then_some(body),
            },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { meter: Some(_), .. } => "metered",
            Kind::Inner { meter: None, .. } => "unmetered",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Rejected { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            KindProj::Inner {
                mut body,
                meter,
                filter,
                ended,
            } => loop {
                if let Some(frame) = filter.as_mut().and_then(UsageChunkFilter::pop) {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                let frame = ready!(body.as_mut().poll_frame(cx));
                // Trailers end the body: hyper stops polling once it has sent them, so the
                // `None` after them (or `is_end_stream`) may never be seen.
                let end = match &frame {
                    None => true,
                    Some(Ok(f)) => f.is_trailers() || body.is_end_stream(),
                    Some(Err(_)) => false,
                };
                let mut usage_free = false;
                if let Some(m) = meter.as_mut() {
                    match &frame {
                        Some(Ok(f)) => {
                            if let Some(data) = f.data_ref() {
                                usage_free = m.on_data(data);
                            } else if let Some(trailers) = f.trailers_ref() {
                                m.on_trailers(trailers);
                            }
                        }
                        Some(Err(_)) => m.settle(End::BodyError),
                        None => {}
                    }
                    // A server may stop polling (and drop the body) once the end is seen.
                    if end {
                        m.settle(End::Complete);
                    }
                }
                let Some(f) = filter.as_mut() else {
                    *ended |= end;
                    return Poll::Ready(frame);
                };
                match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) if f.passes_whole(&data, usage_free) => {
                            *ended |= end;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(data) => f.push(data, usage_free),
                        Err(frame) => match frame.into_trailers() {
                            // Trailers end the body: what is held back goes first.
                            Ok(trailers) => {
                                *ended = true;
                                f.finish_with_trailers(trailers);
                                continue;
                            }
                            Err(frame) => return Poll::Ready(Some(Ok(frame))),
                        },
                    },
                    None => *ended = true,
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                }
                if *ended || end {
                    *ended = true;
                    f.finish();
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner {
                body,
                filter,
                ended,
                ..
            } => {
                (*ended || body.is_end_stream())
                    && !filter.as_ref().is_some_and(UsageChunkFilter::has_pending)
            }
            Kind::Rejected { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // Filtering changes the length.
            Kind::Inner {
                filter: Some(_), ..
            } => SizeHint::default(),
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Rejected { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
