//! Token usage as LLM providers report it, read from response bodies as they pass.
//!
//! A [`UsageScanner`] is fed every frame of a response body, SSE stream or plain JSON, and
//! reports the [`Usage`] in it. The provider is recognised from the payload, with no
//! configuration:
//!
//! | provider / API | where the usage is |
//! |---|---|
//! | OpenAI Chat Completions, Completions, Embeddings, and the APIs that copy them (Azure, DeepSeek, Mistral, Groq, xAI) | `usage`; the last non-null one wins |
//! | OpenAI Responses API (also xAI's) | `response.usage` of `response.completed` / `.incomplete` / `.failed`; top-level `usage` in a body |
//! | Anthropic Messages | `message_start.message.usage`, then each `message_delta.usage`: every field's latest value wins; `usage.iterations[]` is summed |
//! | Google Gemini | `usageMetadata`; the last one wins |
//!
//! The scan never changes or holds on to the bytes: events are split with a memchr-class pass
//! and only those that carry a non-null usage are parsed. Memory is bounded: of an SSE event
//! larger than the cap (1 MiB by default) only the members a usage is read from are kept as it
//! passes (its top-level `type`, `usage` and `usageMetadata`, and the `usage` of a top-level
//! `message` or `response`: up to 64 KiB of them), and so are those of a JSON object larger
//! than the cap; of any other JSON body (an array) larger than the cap only a 64 KiB tail is
//! kept. Malformed input never panics; it reports no usage.
//!
//! ```
//! use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};
//!
//! let format = BodyFormat::from_content_type("text/event-stream; charset=utf-8").unwrap();
//! let mut scanner = UsageScanner::new(format);
//! // Frames may split events anywhere.
//! scanner.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,");
//! scanner.feed(b"\"completion_tokens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n");
//! let usage = scanner.finish().expect("the stream reported its usage");
//! assert_eq!(usage.input_tokens, Some(3));
//! assert_eq!(usage.output_tokens, Some(5));
//! assert_eq!(usage.total(), 8);
//! ```

use std::fmt;
use std::sync::LazyLock;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

mod anthropic;
mod extractor;
mod gemini;
mod json;
mod needle;
mod openai;
mod outline;
mod sse;
pub(crate) mod wire;

pub(crate) use needle::Needle;

pub use extractor::{HeaderUsage, UsageExtractor};
use wire::{Kind, Obj, WireUsage};

/// Default cap on an SSE event and on a buffered JSON body.
const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// Start of every key that carries usage: `"usage"` and `"usageMetadata"`.
const USAGE_NEEDLE: &[u8] = b"\"usage";

static USAGE_FINDER: LazyLock<Needle> = LazyLock::new(|| Needle::new(USAGE_NEEDLE));

/// A `type` key, which changes how a usage is read (Anthropic's events and bodies).
static TYPE_FINDER: LazyLock<Needle> = LazyLock::new(|| Needle::new(b"\"type\""));

/// Token counts as a provider reported them (`None` = not reported).
///
/// Each field holds the provider's own figure, never recomputed: whether cached or reasoning
/// tokens are part of the input or output counts depends on the provider (see the fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens: `prompt_tokens` (OpenAI chat), `input_tokens` (OpenAI Responses,
    /// Anthropic), `promptTokenCount` (Gemini). Anthropic's excludes cache reads and writes;
    /// the others include cached tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens: `completion_tokens`, `output_tokens`, `candidatesTokenCount`. Includes
    /// reasoning tokens for OpenAI and Anthropic; excludes them for Gemini and xAI chat.
    pub output_tokens: Option<u64>,
    /// The total as reported (`total_tokens`, `totalTokenCount`); Anthropic reports none.
    pub total_tokens: Option<u64>,
    /// Input tokens read from a cache: `cached_tokens` of the input details (OpenAI, part of
    /// the input), `cache_read_input_tokens` (Anthropic, not part of the input),
    /// `cachedContentTokenCount` (Gemini, part of the input).
    pub cached_input_tokens: Option<u64>,
    /// Input tokens written to a cache: `cache_creation_input_tokens` (Anthropic only, not part
    /// of the input; 0 when an Anthropic usage reports cache reads without it, which marks
    /// those reads as outside the input too).
    pub cache_creation_input_tokens: Option<u64>,
    /// Reasoning tokens: `reasoning_tokens` of the output details (OpenAI),
    /// `thoughtsTokenCount` (Gemini), `output_tokens_details.thinking_tokens` (Anthropic,
    /// when reported).
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Every token the provider reports processing: the default cost (SPEC 3.3).
    ///
    /// This is `total_tokens` when reported: some OpenAI-compatible providers count reasoning
    /// tokens only there. Without a total, it is the sum of the categories,
    /// `input + output + cache_creation + cached_input`, where the cached input is added only
    /// when a cache-creation count is reported too: that is Anthropic's usage (the only one
    /// without a total), whose `input_tokens` leaves out cache reads and writes, whereas
    /// elsewhere cached tokens are a part of the input. Missing fields count as 0; the sum
    /// saturates.
    pub fn total(&self) -> u64 {
        if let Some(total) = self.total_tokens {
            return total;
        }
        let mut sum = count(self.input_tokens).saturating_add(count(self.output_tokens));
        if let Some(created) = self.cache_creation_input_tokens {
            sum = sum
                .saturating_add(created)
                .saturating_add(count(self.cached_input_tokens));
        }
        sum
    }

    /// The Higress `input_output` preset: the provider's input field plus its output field
    /// (`prompt_tokens + completion_tokens`, `input_tokens + output_tokens`,
    /// `promptTokenCount + candidatesTokenCount`). Missing fields count as 0; saturating.
    pub fn input_output(&self) -> u64 {
        count(self.input_tokens).saturating_add(count(self.output_tokens))
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Takes every field `newer` reports.
    fn overlay(&mut self, newer: &Self) {
        let fields = [
            (&mut self.input_tokens, newer.input_tokens),
            (&mut self.output_tokens, newer.output_tokens),
            (&mut self.total_tokens, newer.total_tokens),
            (&mut self.cached_input_tokens, newer.cached_input_tokens),
            (
                &mut self.cache_creation_input_tokens,
                newer.cache_creation_input_tokens,
            ),
            (&mut self.reasoning_tokens, newer.reasoning_tokens),
        ];
        for (field, newer) in fields {
            if newer.is_some() {
                *field = newer;
            }
        }
    }
}

fn count(field: Option<u64>) -> u64 {
    field.unwrap_or(0)
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// Server-sent events (`text/event-stream`): the usage is in the events' data.
    Sse,
    /// One JSON document (`application/json`): the usage is read at the end of the body.
    Json,
}

impl BodyFormat {
    /// The format of a body with this `Content-Type` value: `text/event-stream` is
    /// [`Sse`](Self::Sse); `application/json` and any `application/*+json` are
    /// [`Json`](Self::Json); anything else is `None` (not metered by parsing). Parameters
    /// (`; charset=utf-8`) and letter case are ignored.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        // The usual values, without parsing.
        match content_type {
            "text/event-stream" => return Some(Self::Sse),
            "application/json" => return Some(Self::Json),
            _ => {}
        }
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        let (kind, subtype) = media_type.split_once('/')?;
        let subtype_is = |s: &str| subtype.eq_ignore_ascii_case(s);
        if kind.eq_ignore_ascii_case("text") && subtype_is("event-stream") {
            return Some(Self::Sse);
        }
        let json_suffix = subtype.len() > 5
            && subtype.is_char_boundary(subtype.len() - 5)
            && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json");
        (kind.eq_ignore_ascii_case("application") && (subtype_is("json") || json_suffix))
            .then_some(Self::Json)
    }
}

/// Incremental usage scanner over a response body.
///
/// Feed it every frame as it passes, then call [`finish`](Self::finish) at the end of the
/// body. It never modifies the bytes and keeps none of them beyond bounded buffers: the part
/// of an SSE event that spans frames, or a JSON body (up to the cap, then up to 64 KiB of its
/// outline, or for a JSON array a 64 KiB tail). The result does not depend on how the body was
/// split into frames.
#[derive(Debug)]
pub struct UsageScanner {
    body: Body,
    seen: Accumulator,
    finished: bool,
    /// Bytes of a byte order mark matched at the body's start while it is not yet known
    /// whether one is there; `None` once it is.
    bom: Option<u8>,
}

/// UTF-8's byte order mark, dropped at the start of a body (a response's here, a request's by
/// the request probe): SSE ignores it, and a JSON parser would refuse the body.
pub(crate) const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug)]
enum Body {
    Sse(sse::EventSplitter),
    Json(json::JsonBody),
}

impl UsageScanner {
    /// A scanner for a body in `format`, with the default cap of 1 MiB.
    pub fn new(format: BodyFormat) -> Self {
        let body = match format {
            BodyFormat::Sse => Body::Sse(
                sse::EventSplitter::new(carries_usage, DEFAULT_MAX_EVENT_BYTES)
                    .with_candidates(count_key_candidate)
                    .with_settling(sse::Settling {
                        last_candidate: last_count_key_candidate,
                        settles: replaces_usage,
                    }),
            ),
            BodyFormat::Json => Body::Json(json::JsonBody::new(DEFAULT_MAX_EVENT_BYTES)),
        };
        Self {
            body,
            seen: Accumulator::default(),
            finished: false,
            bom: Some(0),
        }
    }

    /// Sets the cap (default 1 MiB): the largest SSE event data (its `data:` lines joined) or
    /// JSON body kept and parsed whole. A larger event or JSON object is read as it passes for
    /// the members a usage is read from (nothing else in it is checked to be well-formed); a
    /// larger JSON array is read from its last 64 KiB. Set it before feeding.
    pub fn with_max_event_bytes(mut self, max: usize) -> Self {
        match &mut self.body {
            Body::Sse(splitter) => splitter.set_max_event(max),
            Body::Json(body) => body.set_max(max),
        }
        self
    }

    /// Reads the next frame of the body. Ignored after [`finish`](Self::finish).
    pub fn feed(&mut self, chunk: &[u8]) {
        self.feed_checked(chunk);
    }

    /// [`feed`](Self::feed), returning whether the frame's whole events are known to hold
    /// no key a token count is read from (`false`: not known).
    pub(crate) fn feed_checked(&mut self, mut chunk: &[u8]) -> bool {
        if self.finished {
            return false;
        }
        if let Some(seen) = self.bom {
            let rest = &BOM[usize::from(seen)..];
            let n = rest.len().min(chunk.len());
            if chunk[..n] == rest[..n] {
                if n < rest.len() {
                    self.bom = Some(seen + n as u8);
                    return false;
                }
                chunk = &chunk[n..];
            } else {
                // No mark: the bytes held back are the body's first.
                self.feed_body(&BOM[..usize::from(seen)]);
            }
            self.bom = None;
        }
        self.feed_body(chunk)
    }

    fn feed_body(&mut self, chunk: &[u8]) -> bool {
        match &mut self.body {
            Body::Sse(splitter) => {
                let seen = &mut self.seen;
                splitter.feed(chunk, |data| parse_json(data, seen))
            }
            Body::Json(body) => {
                body.feed(chunk);
                false
            }
        }
    }

    /// Ends the body: reads an SSE event left without its blank line, or parses the JSON body.
    /// Returns the usage if any was reported. Calling it again returns the same.
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.finished {
            if let Some(seen) = self.bom.take() {
                self.feed_body(&BOM[..usize::from(seen)]);
            }
            self.finished = true;
            match &mut self.body {
                Body::Sse(splitter) => {
                    let seen = &mut self.seen;
                    splitter.finish(|data| parse_json(data, seen));
                }
                Body::Json(body) => body.finish(&mut self.seen),
            }
        }
        self.seen.usage
    }

    /// The usage reported so far: for a stream, from the events read up to now; for a JSON
    /// body, `None` until [`finish`](Self::finish).
    pub fn usage(&self) -> Option<Usage> {
        self.seen.usage
    }

    /// Whether the usage so far is a placeholder that a later event would have completed (an
    /// Anthropic stream that ended before `message_delta`).
    pub(crate) fn is_provisional(&self) -> bool {
        self.seen.provisional
    }
}

/// Usage found in one event or body, and how it combines with what came before.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) usage: Usage,
    pub(crate) merge: Merge,
    /// A placeholder a later report completes (Anthropic's `message_start`, whose output
    /// count is 1 until `message_delta`).
    pub(crate) provisional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merge {
    /// The new usage replaces the old (OpenAI, Gemini: the last report wins).
    Replace,
    /// Each field reported replaces the old one (Anthropic: cumulative per field).
    Fieldwise,
}

/// The usage seen so far in a body.
#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    usage: Option<Usage>,
    /// The last report was a placeholder.
    provisional: bool,
    /// A report replaced the usage whole: what came before it no longer counts.
    replaced: bool,
}

impl Accumulator {
    /// A report without any count (`{}`, `{"trafficType": …}`) is no report.
    pub(crate) fn apply(&mut self, report: Report) {
        if report.usage.is_empty() {
            return;
        }
        self.provisional = report.provisional;
        match report.merge {
            Merge::Replace => {
                self.usage = Some(report.usage);
                self.replaced = true;
            }
            Merge::Fieldwise => {
                let usage = self.usage.get_or_insert_default();
                usage.overlay(&report.usage);
                // Anthropic's cache reads are outside its input; a cache-creation count (0
                // when it reports none) is what tells `total` and the cost so.
                if usage.cached_input_tokens.is_some() {
                    usage.cache_creation_input_tokens.get_or_insert(0);
                }
            }
        }
    }
}

/// The top level of an event's data or of a body: every place the providers put usage.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Kind,
    /// OpenAI (all APIs' bodies, chat streams), Anthropic `message_delta` and bodies.
    usage: Obj<WireUsage>,
    /// Anthropic `message_start`.
    message: Obj<HasUsage>,
    /// OpenAI Responses stream events.
    response: Obj<HasUsage>,
    /// Gemini.
    #[serde(rename = "usageMetadata")]
    usage_metadata: Obj<gemini::UsageMetadata>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct HasUsage {
    usage: Obj<WireUsage>,
}

impl Envelope {
    fn report(self) -> Option<Report> {
        if let Some(meta) = self.usage_metadata.0 {
            return Some(gemini::report(&meta));
        }
        let usage = match self.kind {
            Kind::MessageStart => self.message.0.and_then(|m| m.usage.0),
            _ => self
                .usage
                .0
                .or_else(|| self.response.0.and_then(|r| r.usage.0)),
        };
        let provisional = self.kind == Kind::MessageStart;
        usage.map(|usage| Report {
            provisional,
            ..usage_report(self.kind, &usage)
        })
    }
}

/// A `usage` object read by the vocabulary it is in.
fn usage_report(kind: Kind, usage: &WireUsage) -> Report {
    if kind != Kind::Other || anthropic::looks_like(usage) {
        anthropic::report(usage)
    } else {
        openai::report(usage)
    }
}

/// Applies the usage in a JSON body, parsing it only if it [`carries_usage`].
fn scan_json(document: &[u8], seen: &mut Accumulator) {
    if carries_usage(document) {
        parse_json(document, seen);
    }
}

/// Applies the usage in a JSON document: an SSE event's data or a whole body. An object is one
/// report; an array (Gemini's stream without `alt=sse`) one per element, in order.
/// Malformed documents report nothing, unless what is broken lies before a usage key that
/// [`top_level_usage`] reads on its own.
fn parse_json(document: &[u8], seen: &mut Accumulator) {
    if let Some(report) = top_level_usage(document) {
        if let Some(report) = report {
            seen.apply(report);
        }
        return;
    }
    parse_whole(document, seen);
}

/// [`parse_json`] by parsing the whole document.
fn parse_whole(document: &[u8], seen: &mut Accumulator) {
    let mut deserializer = serde_json::Deserializer::from_slice(document);
    // A document that turns out malformed reports what was complete before the error
    // (elements of an array), nothing else.
    let _ = Apply(seen).deserialize(&mut deserializer);
}

/// The report of `document` read from its usage key alone, the bytes before the key (an
/// event's content) not looked into, when that is what parsing the whole document reports:
/// the key is the document's only usage key, there is no `type` key anywhere (which changes how
/// usage is read), and it is a member of the object that makes up the document: the document
/// starts with `{`, and after the key's value come only `, "key": value` members and the
/// closing `}`. In valid JSON that leaves the key no other place; a document broken before its
/// usage key may have that usage read where a full parse would give up. `None` when not sure.
fn top_level_usage(document: &[u8]) -> Option<Option<Report>> {
    let at = USAGE_FINDER.find(document)?;
    if !skip_whitespace(document).starts_with(b"{")
        || !matches!(
            skip_whitespace_back(&document[..at]).last(),
            Some(b'{' | b',')
        )
        || USAGE_FINDER.find(&document[at + 1..]).is_some()
        || TYPE_FINDER.find(document).is_some()
    {
        return None;
    }
    let (key, start) = usage_value_at(document, at)?;
    let (report, mut rest) = read_usage(key, &document[start..])?;
    loop {
        match skip_whitespace(rest).split_first()? {
            (b'}', after) => return skip_whitespace(after).is_empty().then_some(report),
            (b',', after) => rest = skip_member(after)?,
            _ => return None,
        }
    }
}

/// Past one `"key": value` member at the start of `bytes` (after whitespace).
fn skip_member(bytes: &[u8]) -> Option<&[u8]> {
    let bytes = skip_whitespace(bytes);
    if !bytes.starts_with(b"\"") {
        return None;
    }
    let (IgnoredAny, rest) = read_value::<IgnoredAny>(bytes)?;
    let (IgnoredAny, rest) = read_value::<IgnoredAny>(skip_whitespace(rest).strip_prefix(b":")?)?;
    Some(rest)
}

/// The value of a usage key (`key`) at the start of `bytes`, as its own report (`None` when it
/// is not an object), and the bytes after it; `None` when it is not JSON. Outside an envelope,
/// a `usage` reads in its own vocabulary (OpenAI, or Anthropic's by its fields).
fn read_usage(key: UsageKey, bytes: &[u8]) -> Option<(Option<Report>, &[u8])> {
    Some(match key {
        UsageKey::Usage => {
            let (usage, rest) = read_value::<Obj<WireUsage>>(bytes)?;
            (usage.0.map(|u| usage_report(Kind::Other, &u)), rest)
        }
        UsageKey::Metadata => {
            let (meta, rest) = read_value::<Obj<gemini::UsageMetadata>>(bytes)?;
            (meta.0.map(|m| gemini::report(&m)), rest)
        }
    })
}

/// One JSON value at the start of `bytes` (after whitespace), and the bytes after it.
fn read_value<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Option<(T, &'de [u8])> {
    let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<T>();
    let value = values.next()?.ok()?;
    Some((value, &bytes[values.byte_offset()..]))
}

struct Apply<'a>(&'a mut Accumulator);

impl<'de> DeserializeSeed<'de> for Apply<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Apply<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let envelope = Envelope::deserialize(MapAccessDeserializer::new(map))?;
        if let Some(report) = envelope.report() {
            self.0.apply(report);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Apply(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// Which usage key starts at a match of [`USAGE_NEEDLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageKey {
    /// `"usage"`.
    Usage,
    /// `"usageMetadata"`.
    Metadata,
}

/// If `document[at..]` is a `"usage"` or `"usageMetadata"` key (not inside a string, as far as
/// one byte before it tells) with a value other than `null`: the key and where its value
/// starts. A key at the very end, its value not seen, counts: an SSE data line may end there
/// and the value follow on the next line.
fn usage_value_at(document: &[u8], at: usize) -> Option<(UsageKey, usize)> {
    if at > 0 && document[at - 1] == b'\\' {
        return None;
    }
    let rest = &document[at + USAGE_NEEDLE.len()..];
    let (key, rest) = if let Some(rest) = rest.strip_prefix(b"\"") {
        (UsageKey::Usage, rest)
    } else {
        (UsageKey::Metadata, rest.strip_prefix(b"Metadata\"")?)
    };
    let rest = skip_whitespace(rest);
    if rest.is_empty() {
        return Some((key, document.len()));
    }
    let rest = skip_whitespace(rest.strip_prefix(b":")?);
    if rest.starts_with(b"null") {
        return None;
    }
    Some((key, document.len() - rest.len()))
}

fn skip_whitespace_back(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

fn skip_whitespace(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Whether `document` (a body, or one SSE data line) has a usage key whose value is not
/// `null`: only those are parsed.
fn carries_usage(document: &[u8]) -> bool {
    USAGE_FINDER
        .positions(document)
        .any(|at| usage_value_at(document, at).is_some())
}

/// Part of every key a count is read from: all of them end in `tokens` or `TokenCount`
/// (`prompt_tokens`, `cache_read_input_tokens`, `promptTokenCount`, …).
const COUNT_KEY_NEEDLE: &[u8] = b"oken";

static COUNT_KEY_FINDER: LazyLock<Needle> = LazyLock::new(|| Needle::new(COUNT_KEY_NEEDLE));

/// Where the first key in `bytes` that may name a token count starts (`…okens"` or
/// `…okenCount"`, but not `max_…`, the request's caps that Responses and Anthropic events
/// echo; at the very end of `bytes`, any `oken`, the rest may follow in the next chunk). An
/// event without one reports no usage whatever usage key it has (the `"usage":null` OpenAI
/// puts in every chunk, Gemini's `{"trafficType": …}`), so the events before it are passed over
/// unread, and the search does not stop at every chunk's usage key.
fn count_key_candidate(bytes: &[u8]) -> Option<usize> {
    COUNT_KEY_FINDER
        .positions(bytes)
        .find(|&at| names_a_count(bytes, at))
}

/// [`count_key_candidate`], searching from the end: where the last one starts.
fn last_count_key_candidate(bytes: &[u8]) -> Option<usize> {
    // By the needle's rarer byte, with memchr's vectorised reverse search (memmem's reverse
    // search is not vectorised).
    memchr::memrchr_iter(b'k', bytes)
        .filter_map(|k| k.checked_sub(1))
        .find(|&at| bytes[at..].starts_with(COUNT_KEY_NEEDLE) && names_a_count(bytes, at))
}

/// Whether the [`COUNT_KEY_NEEDLE`] at `at` may be part of a key naming a count.
fn names_a_count(bytes: &[u8], at: usize) -> bool {
    let rest = &bytes[at + COUNT_KEY_NEEDLE.len()..];
    let names_a_count = [&b"s\""[..], b"Count\""].iter().any(|end| {
        let n = end.len().min(rest.len());
        rest[..n] == end[..n]
    });
    let is_a_cap = || {
        memchr::memrchr(b'"', &bytes[..at]).is_some_and(|q| bytes[q + 1..at].starts_with(b"max_"))
    };
    names_a_count && !is_a_cap()
}

/// Whether an event's data reports a usage that replaces the one before it whole (OpenAI's,
/// Gemini's): the events before it then change nothing. Events with a `type` (Anthropic's,
/// whose usage merges field by field, and Responses') are not parsed to find out.
fn replaces_usage(data: &[u8]) -> bool {
    if TYPE_FINDER.find(data).is_some() {
        return false;
    }
    let mut seen = Accumulator::default();
    parse_json(data, &mut seen);
    seen.replaced
}

/// `extend_from_slice`, growing the capacity no further than `max` (callers never add past
/// it), so that a buffer filled in pieces up to the cap stays within the cap.
fn extend_bounded(buf: &mut Vec<u8>, bytes: &[u8], max: usize) {
    let needed = buf.len() + bytes.len();
    if needed > buf.capacity() {
        let target = (buf.capacity() * 2).max(needed).min(max.max(needed));
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(bytes);
}

// A scanner moves into the response body, which may cross threads.
const _: fn() = || {
    fn is_send_sync<T: Send + Sync + 'static>() {}
    is_send_sync::<UsageScanner>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(body: &[u8]) -> Option<Usage> {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        scanner.feed(body);
        scanner.finish()
    }

    fn json(body: &[u8]) -> Option<Usage> {
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(body);
        scanner.finish()
    }

    /// A byte order mark at the start of a body is dropped, however the frames cut it; bytes
    /// that only begin like one are the body's own.
    #[test]
    fn a_leading_byte_order_mark_is_dropped_at_any_split() {
        let usage = r#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        for (format, body) in [
            (BodyFormat::Json, usage.to_owned()),
            (
                BodyFormat::Sse,
                format!("data: {usage}\n\ndata: [DONE]\n\n"),
            ),
        ] {
            let marked = [BOM, body.as_bytes()].concat();
            for i in 0..=marked.len() {
                for j in i..=marked.len().min(i + 4) {
                    let mut scanner = UsageScanner::new(format);
                    for part in [&marked[..i], &marked[i..j], &marked[j..]] {
                        scanner.feed(part);
                    }
                    let got = scanner.finish().and_then(|u| u.total_tokens);
                    assert_eq!(got, Some(8), "{format:?} split at {i}, {j}");
                }
            }
        }
        // Two bytes of a mark, then not the third: the body is not JSON.
        assert_eq!(
            json(&[&BOM[..2], br#"{"usage":{"total_tokens":8}}"#].concat()),
            None
        );
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(&BOM[..2]);
        assert_eq!(scanner.finish(), None, "a body of two bytes of a mark");
    }

    #[test]
    fn content_types() {
        use BodyFormat::{Json, Sse};
        for (content_type, format) in [
            ("text/event-stream", Some(Sse)),
            ("text/event-stream; charset=utf-8", Some(Sse)),
            ("Text/Event-Stream", Some(Sse)),
            (" text/event-stream ;charset=utf-8", Some(Sse)),
            ("application/json", Some(Json)),
            ("application/json; charset=utf-8", Some(Json)),
            ("APPLICATION/JSON", Some(Json)),
            ("application/problem+json", Some(Json)),
            ("application/vnd.api+JSON", Some(Json)),
            ("application/+json", None),
            ("application/x-ndjson", None),
            ("application/jsonl", None),
            ("text/json", None),
            ("text/plain", None),
            ("application/grpc", None),
            ("application/octet-stream", None),
            ("event-stream", None),
            ("", None),
            ("application/é+json", Some(Json)),
            ("application/éjson", None),
        ] {
            assert_eq!(
                BodyFormat::from_content_type(content_type),
                format,
                "{content_type:?}"
            );
        }
    }

    #[test]
    fn total_uses_the_reported_total() {
        let usage = Usage {
            input_tokens: Some(291),
            output_tokens: Some(26),
            total_tokens: Some(513),
            cached_input_tokens: Some(290),
            cache_creation_input_tokens: None,
            reasoning_tokens: Some(196),
        };
        assert_eq!(usage.total(), 513);
        assert_eq!(usage.input_output(), 317);
    }

    #[test]
    fn total_without_a_reported_total() {
        let anthropic = Usage {
            input_tokens: Some(10),
            output_tokens: Some(20),
            cached_input_tokens: Some(300),
            cache_creation_input_tokens: Some(4000),
            ..Usage::default()
        };
        assert_eq!(anthropic.total(), 4330);
        assert_eq!(anthropic.input_output(), 30);
        // Without a cache-creation count, cached input is taken as part of the input.
        let subset = Usage {
            input_tokens: Some(10),
            output_tokens: Some(20),
            cached_input_tokens: Some(8),
            ..Usage::default()
        };
        assert_eq!(subset.total(), 30);
        assert_eq!(Usage::default().total(), 0);
        let huge = Usage {
            input_tokens: Some(u64::MAX),
            output_tokens: Some(1),
            cache_creation_input_tokens: Some(u64::MAX),
            ..Usage::default()
        };
        assert_eq!(huge.total(), u64::MAX);
        assert_eq!(huge.input_output(), u64::MAX);
    }

    #[test]
    fn usage_keys_with_null_values_are_not_parsed() {
        assert!(!carries_usage(b"{\"usage\":null}"));
        assert!(!carries_usage(
            b"{\"usage\" :\n null, \"usageMetadata\": null}"
        ));
        assert!(!carries_usage(b"{\"usage_breakdown\":{\"a\":1}}"));
        assert!(!carries_usage(b"{\"text\":\"\\\"usage\\\": {}\"}"));
        assert!(!carries_usage(b"{\"usage\" 1"));
        // The value may be on the next line of a multi-line SSE event.
        assert!(carries_usage(b"{\"usage\""));
        assert!(carries_usage(b"{\"usage\" :"));
        assert!(carries_usage(b"{\"usage\": {}}"));
        assert!(carries_usage(b"{\"usage\":null,\"x\":{\"usage\":{}}}"));
        assert!(carries_usage(b"{\"usageMetadata\" : {\"a\": 1}}"));
    }

    #[test]
    fn usage_split_over_data_lines() {
        let body = b"data: {\"usage\"\ndata: :\ndata: {\"prompt_tokens\":1}}\n\n";
        for i in 0..=body.len() {
            let mut scanner = UsageScanner::new(BodyFormat::Sse);
            scanner.feed(&body[..i]);
            scanner.feed(&body[i..]);
            assert_eq!(
                scanner.finish().unwrap().input_tokens,
                Some(1),
                "cut at {i}"
            );
        }
        assert_eq!(sse(b"data: {\"usage\":\ndata: null}\n\n"), None);
    }

    #[test]
    fn garbage_and_odd_values_report_nothing() {
        for data in [
            &b"data: not json\n\n"[..],
            b"data: {\"usage\":\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":12\n\n",
            b"data: {\"usage\":null}\n\n",
            b"data: {\"usage\":{}}\n\n",
            b"data: {\"usage\":\"12\"}\n\n",
            b"data: {\"usage\":[{\"prompt_tokens\":1}]}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":-1,\"completion_tokens\":-2,\"total_tokens\":-3}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":1.5,\"total_tokens\":\"3\"}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":1e400}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":18446744073709551616}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":9007199254740993}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":1},\"usage\":{\"prompt_tokens\":2}}\n\n",
            b"data: {\"usageMetadata\":{\"promptTokenCount\":true}}\n\n",
            b"data: {\"type\":\"message_start\",\"message\":\"usage\",\"usage\":1}\n\n",
            b"\xff\xfe\x00data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
            b"data: {\"usage\":{\"prompt_tokens\":\"\xff\"}}\n\n",
        ] {
            let text = String::from_utf8_lossy(data);
            assert_eq!(sse(data), None, "{text}");
            let body = data
                .strip_prefix(b"data: ")
                .map_or(data, |b| b.strip_suffix(b"\n\n").unwrap_or(b));
            assert_eq!(json(body), None, "body {text}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        let mut body = "[".repeat(100_000);
        body.push_str("{\"usage\":{\"prompt_tokens\":1}}");
        assert_eq!(json(body.as_bytes()), None);
        assert_eq!(sse(format!("data: {body}\n\n").as_bytes()), None);
        // Within serde_json's depth limit, arrays are read element by element.
        let shallow = format!(
            "{}{{\"usage\":{{\"prompt_tokens\":1}}}}{}",
            "[".repeat(10),
            "]".repeat(10)
        );
        assert_eq!(json(shallow.as_bytes()).unwrap().input_tokens, Some(1));
    }

    #[test]
    fn absurd_counts_are_dropped_field_by_field() {
        let usage = sse(b"data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":99999999999999999999,\"total_tokens\":-1}}\n\n").unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: Some(5),
                ..Usage::default()
            }
        );
        let usage = sse(b"data: {\"usage\":{\"prompt_tokens\":9007199254740992}}\n\n").unwrap();
        assert_eq!(usage.input_tokens, Some(1 << 53));
    }

    #[test]
    fn trailing_bytes_after_a_body_are_ignored() {
        // Already-parsed usage is not taken back by garbage after the document.
        assert_eq!(
            json(b"{\"usage\":{\"prompt_tokens\":1}} trailing")
                .unwrap()
                .input_tokens,
            Some(1)
        );
    }

    #[test]
    fn feed_after_finish_is_ignored() {
        let mut scanner = UsageScanner::new(BodyFormat::Sse);
        scanner.feed(b"data: {\"usage\":{\"prompt_tokens\":1}}");
        assert_eq!(scanner.usage(), None);
        assert_eq!(scanner.finish().unwrap().input_tokens, Some(1));
        scanner.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n");
        assert_eq!(scanner.finish().unwrap().input_tokens, Some(1));
        assert_eq!(scanner.usage().unwrap().input_tokens, Some(1));
    }

    #[test]
    fn json_usage_is_none_until_finish() {
        let mut scanner = UsageScanner::new(BodyFormat::Json);
        scanner.feed(b"{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":1}}");
        assert_eq!(scanner.usage(), None);
        assert_eq!(scanner.finish().unwrap().total_tokens, Some(1));
        assert_eq!(scanner.usage().unwrap().total_tokens, Some(1));
    }

    /// An event past the cap is read through its outline: the same usage, from the same
    /// places, whatever the framing.
    #[test]
    fn events_past_the_cap_report_the_same_usage() {
        let events = [
            "data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n",
            // Split into data lines, with a nested usage that is not the event's.
            "data: {\"candidates\":[{\"usage\":{\"total_tokens\":1}}],\ndata: \"usageMetadata\":\ndata: {\"totalTokenCount\":12}}\n\n",
            "data: {\"a\":{\"usage\":{\"total_tokens\":1}}}\n\n",
            "data: {\"usage\":{\"prompt_tokens\":1}\n\n",
        ];
        for event in events {
            let read = |max: usize, frame: usize| {
                let mut scanner = UsageScanner::new(BodyFormat::Sse).with_max_event_bytes(max);
                for part in event.as_bytes().chunks(frame) {
                    scanner.feed(part);
                }
                (scanner.finish(), scanner.is_provisional())
            };
            let whole = read(1 << 20, event.len());
            for max in [0, 10, 30] {
                for frame in [1, 5, event.len()] {
                    assert_eq!(read(max, frame), whole, "{event} with a cap of {max}");
                }
            }
        }
    }

    #[test]
    fn merge_rules() {
        let mut seen = Accumulator::default();
        let first = Usage {
            input_tokens: Some(1),
            output_tokens: Some(2),
            ..Usage::default()
        };
        let second = Usage {
            output_tokens: Some(3),
            ..Usage::default()
        };
        seen.apply(Report {
            usage: first,
            merge: Merge::Fieldwise,
            provisional: false,
        });
        seen.apply(Report {
            usage: second,
            merge: Merge::Fieldwise,
            provisional: false,
        });
        assert_eq!(
            seen.usage,
            Some(Usage {
                input_tokens: Some(1),
                output_tokens: Some(3),
                ..Usage::default()
            })
        );
        seen.apply(Report {
            usage: second,
            merge: Merge::Replace,
            provisional: false,
        });
        assert_eq!(seen.usage, Some(second));
        seen.apply(Report {
            usage: Usage::default(),
            merge: Merge::Replace,
            provisional: false,
        });
        assert_eq!(seen.usage, Some(second));
    }

    /// What a document reports after `before`: by the shortcut (`None` when it does not
    /// answer) and by parsing the whole document.
    fn shortcut_and_whole(
        before: Option<Usage>,
        doc: &[u8],
    ) -> (Option<Option<Usage>>, Option<Usage>) {
        let shortcut = top_level_usage(doc).map(|report| {
            let mut seen = Accumulator {
                usage: before,
                ..Accumulator::default()
            };
            if let Some(report) = report {
                seen.apply(report);
            }
            seen.usage
        });
        let mut seen = Accumulator {
            usage: before,
            ..Accumulator::default()
        };
        parse_whole(doc, &mut seen);
        (shortcut, seen.usage)
    }

    /// Something seen before, so that a report that merges differently shows.
    const BEFORE: Usage = Usage {
        input_tokens: Some(1),
        output_tokens: Some(2),
        total_tokens: Some(3),
        cached_input_tokens: Some(4),
        cache_creation_input_tokens: Some(5),
        reasoning_tokens: Some(6),
    };

    #[test]
    fn the_usage_key_shortcut_agrees_with_parsing_on_the_fixtures() {
        let dir = std::env::var_os("TTR_FIXTURES").map_or_else(
            || std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")),
            std::path::PathBuf::from,
        );
        let (mut answered, mut documents) = (0, 0);
        for folder in std::fs::read_dir(&dir).expect("fixtures").flatten() {
            for file in std::fs::read_dir(folder.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = file.path();
                let name = path.to_string_lossy().into_owned();
                let bytes = std::fs::read(&path).unwrap();
                let docs: Vec<&[u8]> = if name.ends_with(".sse") {
                    bytes
                        .split(|&b| b == b'\n')
                        .filter_map(|line| line.strip_prefix(b"data:"))
                        .collect()
                } else if name.ends_with(".nonstream.json") {
                    vec![&bytes[..]]
                } else {
                    continue;
                };
                for doc in docs.into_iter().filter(|d| carries_usage(d)) {
                    documents += 1;
                    for before in [None, Some(BEFORE)] {
                        let (shortcut, whole) = shortcut_and_whole(before, doc);
                        if let Some(shortcut) = shortcut {
                            assert_eq!(shortcut, whole, "{name}: {}", String::from_utf8_lossy(doc));
                            answered += 1;
                        }
                    }
                }
            }
        }
        // OpenAI-style chunks and Gemini events take the shortcut; Anthropic and Responses
        // events (with a `type`) are parsed whole.
        assert!(
            documents > 20 && answered > documents / 2,
            "{answered} of {documents}"
        );
    }

    #[test]
    fn the_usage_key_shortcut_declines_what_it_cannot_be_sure_of() {
        let usage = br#"{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}"#;
        let with = |doc: &str| doc.replace("U", std::str::from_utf8(usage).unwrap());
        for doc in [
            // Nested, not the document's own key.
            r#"{"a":{"usage":U}}"#,
            r#"[{"usage":U}]"#,
            r#"{"a":[{"x":1},{"usage":U,"b":2}]}"#,
            // A second usage key, or a `type`.
            r#"{"usage":U,"usageMetadata":{"totalTokenCount":5}}"#,
            r#"{"type":"message_delta","usage":U}"#,
            r#"{"usage":U,"x":{"type":"function"}}"#,
            // Not a JSON object around it.
            r#"{"usage":U} {"#,
            r#"{"usage":U,}"#,
            r#"{"usage":U"#,
            r#"{"usage":"#,
            r#"x"usage":U}"#,
            r#"{"usage":U,"a"}"#,
            r#"{"usage":U,1:2}"#,
            r#"[[{"usage":U}"#,
            r#"{"a":"\"usage\": 1","usage":U}"#,
        ] {
            let doc = with(doc);
            assert!(top_level_usage(doc.as_bytes()).is_none(), "{doc}");
        }
        // Broken before the usage key: read all the same (the bytes there are not looked into).
        for doc in [r#"{{"usage":U}"#, r#"{"a" "b","usage":U}"#] {
            let doc = with(doc);
            let report = top_level_usage(doc.as_bytes()).flatten();
            assert_eq!(report.map(|r| r.usage.input_tokens), Some(Some(1)), "{doc}");
        }
        for doc in [
            r#"{"usage":U}"#,
            r#" { "id" : "x", "choices":[{"delta":{"content":"a"}}] , "usage" : U , "a" : [1, {"b": null}] } "#,
            r#"{"usage":[1,2],"b":"c"}"#,
            r#"{"usageMetadata":{"promptTokenCount":3,"totalTokenCount":7},"modelVersion":"g"}"#,
        ] {
            let doc = with(doc);
            let (shortcut, whole) = shortcut_and_whole(None, doc.as_bytes());
            assert_eq!(shortcut, Some(whole), "{doc}");
        }
    }

    proptest::proptest! {
        /// Over JSON documents built from the keys that matter, nested anyhow: whenever the
        /// shortcut answers, parsing the whole document says the same.
        #[test]
        fn the_usage_key_shortcut_agrees_with_parsing(doc in json_document(), pretty in proptest::bool::ANY) {
            let text = if pretty {
                serde_json::to_string_pretty(&doc).unwrap()
            } else {
                serde_json::to_string(&doc).unwrap()
            };
            for before in [None, Some(BEFORE)] {
                let (shortcut, whole) = shortcut_and_whole(before, text.as_bytes());
                if let Some(shortcut) = shortcut {
                    proptest::prop_assert_eq!(shortcut, whole, "{}", text);
                }
            }
            // A body past the cap, read through its outline, reads the same.
            if doc.is_object() {
                let mut capped = UsageScanner::new(BodyFormat::Json).with_max_event_bytes(0);
                capped.feed(text.as_bytes());
                let (_, whole) = shortcut_and_whole(None, text.as_bytes());
                proptest::prop_assert_eq!(capped.finish(), whole, "{}", text);
            }
        }
    }

    /// Streams whose events each replace the usage (Gemini's, OpenAI's with a usage in every
    /// chunk) are read from the last such event of each chunk; an event that merges instead
    /// (Anthropic's) stops that for the rest of the stream. Either way the usage is what reading
    /// every event gives, whatever the framing.
    #[test]
    fn events_that_replace_the_usage_settle_the_ones_before_them() {
        let mut events: Vec<String> = (1..=60)
            .map(|n| {
                format!(
                    "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{n} tokens\"}}]}}}}],\"usageMetadata\":{{\"promptTokenCount\":7,\"candidatesTokenCount\":{n},\"totalTokenCount\":{}}}}}\n\n",
                    n + 7
                )
            })
            .collect();
        events.insert(30, "event: x\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n".into());
        let merging = [
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":500}}\n\n".to_string(),
            // Anthropic's vocabulary without a `type`: merged too.
            "data: {\"usage\":{\"input_tokens\":9,\"cache_read_input_tokens\":4}}\n\n".to_string(),
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":501}}\n\n".to_string(),
            "data: {\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5}}\n\n".to_string(),
        ];
        for tail in [&[][..], &merging[..]] {
            let events: Vec<&String> = events.iter().chain(tail).collect();
            let stream: String = events.iter().map(|e| e.as_str()).collect();
            let mut expected = Accumulator::default();
            for event in &events {
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                parse_whole(data.as_bytes(), &mut expected);
            }
            for frame in [1, 100, 700, 4096, 16 * 1024, stream.len()] {
                let mut scanner = UsageScanner::new(BodyFormat::Sse);
                for part in stream.as_bytes().chunks(frame) {
                    scanner.feed(part);
                }
                assert_eq!(scanner.finish(), expected.usage, "{frame}-byte frames");
            }
        }
    }

    /// Found by review: the event taken to settle the ones before it must be one that is handed
    /// over whole. One with an escaped usage key (not handed over: its key is not found), or
    /// past the cap (read through an outline that may report nothing), passed over the reports
    /// before it, so the result depended on the framing.
    #[test]
    fn only_an_event_handed_over_whole_settles_the_ones_before_it() {
        let report = |n: u32| format!(r#"{{"usage":{{"prompt_tokens":{n},"total_tokens":{n}}}}}"#);
        let array = format!(r#"[{},{{"pad":"{}"}}]"#, report(4), "x".repeat(200));
        for (last, cap) in [
            (
                r#"{"us\u0061ge":{"prompt_tokens":4,"total_tokens":4}}"#.to_string(),
                1 << 20,
            ),
            (array, 100),
        ] {
            let events: Vec<String> = [report(1), report(2), report(3), last]
                .iter()
                .map(|d| format!("data: {d}\n\n"))
                .collect();
            let read = |frames: &[String]| {
                let mut scanner = UsageScanner::new(BodyFormat::Sse).with_max_event_bytes(cap);
                for frame in frames {
                    scanner.feed(frame.as_bytes());
                }
                scanner.finish()
            };
            let one = read(&[events.concat()]);
            let two = read(&[events[..2].concat(), events[2..].concat()]);
            assert_eq!(one.and_then(|u| u.total_tokens), Some(3));
            assert_eq!(two, one, "{}", events[3]);
        }
    }

    /// Found by review: a JSON body past the cap is an object or not by its first byte that is
    /// not whitespace, whatever frame it comes in; whitespace in an object is not kept (it
    /// counted against the outline's bound).
    #[test]
    fn json_past_the_cap_whatever_its_whitespace() {
        let body = br#"  [{"usage":{"prompt_tokens":5,"total_tokens":5}}]"#;
        let read = |frames: &[&[u8]]| {
            let mut scanner = UsageScanner::new(BodyFormat::Json).with_max_event_bytes(1);
            for frame in frames {
                scanner.feed(frame);
            }
            scanner.finish().and_then(|u| u.total_tokens)
        };
        assert_eq!(read(&[body]), Some(5));
        assert_eq!(read(&[&body[..2], &body[2..]]), Some(5));
        let mut spaced = br#"{"usage":{"total_tokens":5}"#.to_vec();
        spaced.resize(spaced.len() + 70_000, b' ');
        spaced.extend_from_slice(br#","x":1}"#);
        assert_eq!(read(&[&spaced]), Some(5));
    }

    proptest::proptest! {
        /// Over SSE streams of such documents (pretty ones as one data line per line, so that a
        /// usage key and its counts may be on different lines), cut anywhere: what the scanner
        /// reports, passing over the events before a count key unread, is what parsing every
        /// event whole reports; and so is what it reports with a cap that has some events read
        /// through their outlines.
        #[test]
        fn passing_over_events_without_a_count_key_changes_nothing(
            events in proptest::collection::vec((stream_event(), proptest::bool::ANY), 1..8),
            cuts in proptest::collection::vec(0usize..4096, 0..6),
            cap in 0usize..400,
        ) {
            let mut stream = Vec::new();
            let mut expected = Accumulator::default();
            for (doc, pretty) in &events {
                let text = if *pretty {
                    serde_json::to_string_pretty(doc).unwrap()
                } else {
                    serde_json::to_string(doc).unwrap()
                };
                stream.extend_from_slice(b"event: x\n");
                for line in text.lines() {
                    stream.extend_from_slice(format!("data: {line}\n").as_bytes());
                }
                stream.push(b'\n');
                parse_whole(text.as_bytes(), &mut expected);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut scanner = UsageScanner::new(BodyFormat::Sse);
            let mut capped = UsageScanner::new(BodyFormat::Sse).with_max_event_bytes(cap);
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                scanner.feed(&stream[from..cut]);
                capped.feed(&stream[from..cut]);
                from = cut;
            }
            proptest::prop_assert_eq!(scanner.finish(), expected.usage);
            proptest::prop_assert_eq!(scanner.is_provisional(), expected.provisional);
            // Past the cap only objects are read (documented): an array reports nothing.
            if events.iter().all(|(doc, _)| doc.is_object()) {
                proptest::prop_assert_eq!(capped.finish(), expected.usage, "cap {}", cap);
                proptest::prop_assert_eq!(capped.is_provisional(), expected.provisional);
            }
        }
    }

    /// An event's data: each provider's kind of chunk, with or without counts, or any document
    /// [`json_document`] makes.
    fn stream_event() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let chunk = prop::sample::select(vec![
            r#"{"choices":[{"delta":{"content":"@ tokens"}}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":@,"completion_tokens":@,"total_tokens":@}}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"x"}]}}],"usageMetadata":{"promptTokenCount":@,"totalTokenCount":@}}"#,
            r#"{"candidates":[],"usageMetadata":{"trafficType":"ON_DEMAND"}}"#,
            r#"{"type":"message_start","message":{"usage":{"input_tokens":@,"output_tokens":1}}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":@}}"#,
            r#"{"type":"response.created","response":{"max_output_tokens":@,"usage":null}}"#,
            r#"{"type":"response.completed","response":{"max_output_tokens":9,"usage":{"input_tokens":@,"output_tokens":@}}}"#,
        ]);
        prop_oneof![
            json_document(),
            (chunk, 0u32..1000).prop_map(|(chunk, n)| {
                serde_json::from_str(&chunk.replace('@', &n.to_string())).unwrap()
            }),
        ]
    }

    fn json_document() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec![
            "usage",
            "usageMetadata",
            "type",
            "message",
            "response",
            "choices",
            "id",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "input_tokens",
            "output_tokens",
            "promptTokenCount",
            "candidatesTokenCount",
            "totalTokenCount",
        ]);
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            (0u64..100).prop_map(serde_json::Value::from),
            prop::sample::select(vec![
                "message_start",
                "message_delta",
                "x",
                "\"usage\":{}",
                "\"prompt_tokens\": 3",
                "tokens",
            ])
            .prop_map(serde_json::Value::from),
        ];
        let value = leaf.prop_recursive(4, 40, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| {
                    serde_json::Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    )
                }),
            ]
        });
        prop_oneof![
            1 => value.clone(),
            4 => prop::collection::btree_map(
                prop::sample::select(vec!["usage", "usageMetadata", "type", "message", "id", "choices"]),
                value,
                1..5,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    }
}
