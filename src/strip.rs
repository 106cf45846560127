//! Removes the usage-only chunk from an OpenAI stream whose client did not ask for usage (the
//! layer asked for it on the client's behalf, SPEC 3.4): the client receives exactly the other
//! events, byte for byte.

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use memchr::{memchr2_iter, memrchr2_iter};

use crate::usage::Needle;

/// An event still incomplete past this size is passed on as it is and filtering stops.
const MAX_PENDING: usize = 1 << 20;

static USAGE: LazyLock<Needle> = LazyLock::new(|| Needle::new(b"\"usage\""));
static CHOICES: LazyLock<Needle> = LazyLock::new(|| Needle::new(b"\"choices\""));

/// Holds back the SSE event that is still incomplete at the end of each frame, and passes on
/// every complete event unless it is the usage-only chunk (`"choices": []` with a usage
/// object). Runs of complete events without a usage object go on as slices of the frame they
/// came in (no copy); only the pieces of an event that spans frames are copied.
#[derive(Debug, Default)]
pub(crate) struct UsageChunkFilter {
    /// The start of an event whose end has not arrived.
    pending: BytesMut,
    /// What to send, in order.
    ready: VecDeque<Bytes>,
    /// The body's trailers, sent after `ready`.
    trailers: Option<HeaderMap>,
    /// The last event ended the frame on a `\r`: a `\n` starting the next frame belongs to it
    /// (`\r\n`), and goes where it went.
    after_cr: bool,
    /// The last event was the usage chunk, dropped.
    dropped_last: bool,
    disabled: bool,
}

impl UsageChunkFilter {
    /// Whether a frame can go on as it is, without [`push`](Self::push): nothing is held back
    /// or waiting, and it is whole events none of which is the usage chunk (`usage_free`, as
    /// for `push`, says so without looking), or filtering has stopped. A frame ending on `\r`
    /// goes through `push`, which keeps the `\n` that may follow it with it.
    pub(crate) fn passes_whole(&self, data: &[u8], usage_free: bool) -> bool {
        if self.has_pending() || self.after_cr {
            return false;
        }
        self.disabled
            || (ends_event(data)
                && data.last() != Some(&b'\r')
                && (usage_free || !events(data).any(|(at, end)| is_usage_chunk(&data[at..end]))))
    }

    /// Takes a frame's data; what to send is then read with [`pop`](Self::pop). `usage_free`:
    /// the events wholly inside the frame are known to hold no token count, so they are passed
    /// on unsearched (a usage chunk without a count, which no provider sends, goes on too).
    pub(crate) fn push(&mut self, mut data: Bytes, usage_free: bool) {
        if self.disabled {
            self.ready.push_back(data);
            return;
        }
        if std::mem::take(&mut self.after_cr) && data.first() == Some(&b'\n') {
            let newline = data.split_to(1);
            if !self.dropped_last {
                self.ready.push_back(newline);
            }
        }
        let ends_on_cr = data.last() == Some(&b'\r');
        if !self.pending.is_empty() {
            // The event's blank line may start in what is held.
            let Some(n) = event_end(&self.pending, &data) else {
                self.hold(&data);
                return;
            };
            self.pending.extend_from_slice(&data[..n]);
            let event = self.pending.split().freeze();
            self.pass(event);
            data = data.split_off(n);
        }
        // `data` starts an event: pass the complete ones, hold the rest.
        let cut = last_event_end(&data);
        let tail = data.split_off(cut);
        if !data.is_empty() {
            if !usage_free && has_usage_object(&data) {
                self.pass_events(data);
            } else {
                self.ready.push_back(data);
                self.dropped_last = false;
            }
        }
        self.hold(&tail);
        self.after_cr = ends_on_cr && self.pending.is_empty();
    }

    /// The end of the body: whatever is held back (an event without its blank line) is passed
    /// on, unless it is the usage chunk.
    pub(crate) fn finish(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let rest = self.pending.split().freeze();
        self.pass(rest);
    }

    /// The end of the body with trailers, sent after the data.
    pub(crate) fn finish_with_trailers(&mut self, trailers: HeaderMap) {
        self.finish();
        self.trailers = Some(trailers);
    }

    /// The next frame to send.
    pub(crate) fn pop(&mut self) -> Option<Frame<Bytes>> {
        match self.ready.pop_front() {
            Some(data) => Some(Frame::data(data)),
            None => self.trailers.take().map(Frame::trailers),
        }
    }

    /// Whether bytes are held back or waiting to be sent.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.ready.is_empty() || self.trailers.is_some()
    }

    fn hold(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.pending.capacity() == 0 {
            // Room for a usual event at once, rather than growing by steps.
            self.pending.reserve(bytes.len().max(1024));
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() > MAX_PENDING {
            self.disabled = true;
            let held = self.pending.split().freeze();
            self.ready.push_back(held);
        }
    }

    /// One event, passed on unless it is the usage chunk.
    fn pass(&mut self, event: Bytes) {
        self.dropped_last = is_usage_chunk(&event);
        if !event.is_empty() && !self.dropped_last {
            self.ready.push_back(event);
        }
    }

    /// Complete events, one of which may be the usage chunk: passed on as slices around it.
    fn pass_events(&mut self, events: Bytes) {
        let mut start = 0;
        for (at, end) in self::events(&events) {
            if is_usage_chunk(&events[at..end]) {
                if at > start {
                    self.ready.push_back(events.slice(start..at));
                }
                start = end;
            }
        }
        self.dropped_last = events.len() == start;
        if !self.dropped_last {
            self.ready.push_back(events.slice(start..));
        }
    }
}

/// The `(start, end)` of each complete event in `bytes`, which starts an event.
fn events(bytes: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let end = at + event_end(&[], &bytes[at..])?;
        Some((std::mem::replace(&mut at, end), end))
    })
}

/// Whether some `"usage"` key in `bytes` has an object for its value.
fn has_usage_object(bytes: &[u8]) -> bool {
    key_followed_by(bytes, &USAGE, b":{")
}

/// Whether some `"choices"` key in `bytes` has `[]` for its value: the usage chunk's mark, so
/// that a content chunk carrying usage is not parsed.
fn has_empty_choices(bytes: &[u8]) -> bool {
    key_followed_by(bytes, &CHOICES, b":[]")
}

/// Whether some occurrence of `key` in `bytes` is followed by `tokens`, whitespace allowed
/// around each.
fn key_followed_by(bytes: &[u8], key: &Needle, tokens: &[u8]) -> bool {
    key.positions(bytes).any(|at| {
        bytes[at + key.len()..]
            .iter()
            .filter(|b| !b.is_ascii_whitespace())
            .take(tokens.len())
            .eq(tokens)
    })
}

/// Whether `buf[at]` is a line end (`\r` or `\n`) that directly follows another, so that the line
/// it ends is empty and ends an event: any two line-end bytes in a row but `\r\n`, which is one
/// line end (SSE allows `\n`, `\r\n` and `\r`). `before` holds the bytes that come before
/// `buf`.
fn blank_line_at(before: &[u8], buf: &[u8], at: usize) -> bool {
    let prev = match at.checked_sub(1) {
        Some(i) => buf.get(i),
        None => before.last(),
    };
    matches!(
        (prev, buf[at]),
        (Some(b'\n'), b'\n' | b'\r') | (Some(b'\r'), b'\r')
    )
}

/// Where the event whose blank line ends at `buf[at]` ends: after it, or after the `\n` that
/// makes a `\r` there a `\r\n`.
fn end_after(buf: &[u8], at: usize) -> usize {
    if buf[at] == b'\r' && buf.get(at + 1) == Some(&b'\n') {
        at + 2
    } else {
        at + 1
    }
}

/// Whether `buf` ends where an event does.
fn ends_event(buf: &[u8]) -> bool {
    let n = buf.len();
    (n >= 1 && blank_line_at(&[], buf, n - 1))
        || (n >= 2 && buf[n - 2..] == *b"\r\n" && blank_line_at(&[], buf, n - 2))
}

/// The end (after its blank line) of the first complete event in `buf`, which follows
/// `before`.
fn event_end(before: &[u8], buf: &[u8]) -> Option<usize> {
    memchr2_iter(b'\n', b'\r', buf)
        .find(|&at| blank_line_at(before, buf, at))
        .map(|at| end_after(buf, at))
}

/// The end of the last complete event in `buf`, which starts an event (0 if none).
fn last_event_end(buf: &[u8]) -> usize {
    memrchr2_iter(b'\n', b'\r', buf)
        .find(|&at| blank_line_at(&[], buf, at))
        .map_or(0, |at| end_after(buf, at))
}

fn is_usage_chunk(event: &[u8]) -> bool {
    // `"choices"` first: every content chunk has it, with content.
    if !has_empty_choices(event) || !has_usage_object(event) {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    serde_json::from_slice::<Chunk>(&data)
        .is_ok_and(|c| c.choices.is_some_and(|choices| choices.is_empty()) && c.usage.is_some())
}

/// What tells the usage chunk, read without building a tree (a content chunk carrying usage is
/// read whole on every stream).
#[derive(serde::Deserialize)]
struct Chunk {
    /// Zero-sized elements: counted, not stored.
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    usage: Option<Object>,
}

/// Any JSON object, contents skipped; anything else is an error.
struct Object;

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Object, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Object)
            }
        }
        d.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n\
        data: [DONE]\n\n";

    /// Hands `chunks` over as the body wrapper does (a frame that may pass whole passes
    /// whole, the others are pushed), then ends the body; returns the bytes sent.
    fn filtered<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let drain = |f: &mut UsageChunkFilter, out: &mut Vec<u8>| {
            while let Some(frame) = f.pop() {
                out.extend_from_slice(frame.data_ref().expect("data"));
            }
        };
        for c in chunks {
            let data = Bytes::copy_from_slice(c);
            if f.passes_whole(&data, false) {
                out.extend_from_slice(&data);
            } else {
                f.push(data, false);
            }
            drain(&mut f, &mut out);
        }
        f.finish();
        drain(&mut f, &mut out);
        assert!(!f.has_pending());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn drops_only_the_usage_chunk_in_any_chunking() {
        let want = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        // Every line end SSE allows, alone and mixed within one blank line.
        for end in ["\n", "\r\n", "\r"] {
            let stream = STREAM.replace('\n', end);
            let want = want.replace('\n', end);
            for n in 1..=stream.len() {
                let got = filtered(stream.as_bytes().chunks(n));
                assert_eq!(got, want, "{n}-byte chunks, line end {end:?}");
            }
        }
        for blank in ["\n\r\n", "\r\n\n", "\r\r\n", "\n\r", "\r\n\r"] {
            let stream = STREAM.replace("\n\n", blank);
            let want = want.replace("\n\n", blank);
            for n in 1..=stream.len() {
                let got = filtered(stream.as_bytes().chunks(n));
                assert_eq!(got, want, "{n}-byte chunks, blank line {blank:?}");
            }
        }
    }

    #[test]
    fn events_ending_in_carriage_returns_are_not_held_back() {
        for stream in ["data: {\"x\":1}\r\r", "data: {\"x\":1}\rdata: 2\r\r"] {
            let mut f = UsageChunkFilter::default();
            f.push(Bytes::from(stream), false);
            assert_eq!(f.pop().unwrap().into_data().unwrap(), stream);
            assert!(!f.has_pending(), "{stream:?}");
        }
        // The usage chunk's data lines are read whatever ends them.
        let chunk = "data: {\"choices\":[],\rdata: \"usage\":{\"total_tokens\":3}}\r\r";
        assert!(is_usage_chunk(chunk.as_bytes()));
    }

    #[test]
    fn every_split_into_three_frames_gives_the_same_bytes() {
        for stream in [
            STREAM.to_owned(),
            STREAM.replace('\n', "\r"),
            STREAM.replace("\n\n", "\r\n\r"),
        ] {
            let want = filtered([stream.as_bytes()]);
            let b = stream.as_bytes();
            for i in 0..b.len() {
                for j in i..b.len() {
                    assert_eq!(
                        filtered([&b[..i], &b[i..j], &b[j..]]),
                        want,
                        "{stream:?} split at {i}, {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_empty_choices_with_a_usage_object_is_the_usage_chunk() {
        let event = |json: &str| format!("data: {json}\n\n");
        for (json, usage_chunk) in [
            (r#"{"choices":[],"usage":{"total_tokens":3}}"#, true),
            (
                r#"{"choices": [ ], "usage" : {}, "x": [1, {"y": null}]}"#,
                true,
            ),
            (
                r#"{"choices":[{"delta":{}}],"usage":{"total_tokens":3}}"#,
                false,
            ),
            (r#"{"choices":[],"usage":null}"#, false),
            (r#"{"choices":[],"usage":3}"#, false),
            (r#"{"choices":{},"usage":{}}"#, false),
            (r#"{"usage":{"total_tokens":3}}"#, false),
            (r#"{"choices":[],"usage":{"#, false),
        ] {
            assert_eq!(
                is_usage_chunk(event(json).as_bytes()),
                usage_chunk,
                "{json}"
            );
        }
    }

    #[test]
    fn usage_on_a_content_chunk_is_kept() {
        let s = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":3}}\n\n";
        assert_eq!(filtered([s.as_bytes()]), s);
    }

    #[test]
    fn complete_events_pass_as_the_frame_itself() {
        let frame =
            Bytes::from_static(b"data: {\"usage\":null}\n\ndata: {\"x\":1}\n\ndata: {\"y\"");
        let mut f = UsageChunkFilter::default();
        f.push(frame.clone(), false);
        let sent = f.pop().unwrap().into_data().unwrap();
        // The same memory, not a copy.
        assert_eq!(sent.as_ptr(), frame.as_ptr());
        assert_eq!(&sent[..], b"data: {\"usage\":null}\n\ndata: {\"x\":1}\n\n");
        assert!(f.pop().is_none());
        assert!(f.has_pending());
    }

    #[test]
    fn trailers_follow_the_held_back_data() {
        let mut f = UsageChunkFilter::default();
        f.push(Bytes::from_static(b"data: partial"), false);
        assert!(f.pop().is_none());
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        f.finish_with_trailers(trailers);
        assert_eq!(f.pop().unwrap().into_data().unwrap(), "data: partial");
        assert_eq!(f.pop().unwrap().into_trailers().unwrap()["x-t"], "1");
        assert!(f.pop().is_none());
        assert!(!f.has_pending());
    }

    #[test]
    fn a_huge_event_stops_filtering() {
        let big = vec![b'x'; MAX_PENDING + 1];
        let mut f = UsageChunkFilter::default();
        f.push(Bytes::from(big.clone()), false);
        assert_eq!(f.pop().unwrap().data_ref().unwrap().len(), big.len());
        f.push(Bytes::from_static(b"y"), false);
        assert_eq!(f.pop().unwrap().data_ref().unwrap().len(), 1);
    }
}
