//! Server-sent events split incrementally, at any chunking.
//!
//! Lines end in CRLF, LF or CR (a CR ending one chunk and a LF starting the next are one line
//! end); a blank line ends an event; its `data:` lines are joined with `\n`; comments and the
//! other fields (`event:`, `id:`, `retry:`) are ignored. The event stream is split the same
//! way whatever the chunk boundaries.
//!
//! The splitter only hands over events with a data line its predicate wants (one with a
//! non-null usage key), and passes over the events before the first candidate its caller
//! finds (a key naming a token count) without reading their lines, so most events are dropped
//! after a memchr-class pass over their bytes. In a stream of several such events, once per
//! chunk it looks for the chunk's last whole one and, if that one settles the ones before it
//! (its usage replaces theirs: Gemini's, OpenAI's with a usage in every chunk), passes over
//! those unread too. An event that lies inside one chunk is read in place; only the part of an event that spans a chunk boundary is copied, and at most
//! `max_event` bytes of it: past that, the event's data is read through an [`Outline`] as it
//! passes, which keeps only the members a usage is read from.

use std::mem;
use std::ops::Range;

use memchr::{memchr2, memrchr2};

use super::extend_bounded;
use super::outline::Outline;

/// Data lines of one event kept as ranges of the current chunk before they are copied; past
/// this many, they are copied so that the list stays small (an event of many empty lines).
const MAX_RANGES: usize = 64;

/// Capacity kept for the event buffer between events; a larger one (after a large event) is
/// given back.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct EventSplitter {
    /// Whether a data line makes its event worth handing over.
    wanted: fn(&[u8]) -> bool,
    /// Where in some bytes the first event worth handing over could be (`None`: nowhere);
    /// whole events before it are skipped without reading their lines.
    candidate: fn(&[u8]) -> Option<usize>,
    /// How to tell an event that makes the ones before it change nothing; `None` if none can,
    /// or once an event found that way did not (the stream's events do not replace each other).
    settling: Option<Settling>,
    /// Events handed over whole, not as an outline (counted up to 2: settling events are
    /// looked for in a stream of several).
    handed: u8,
    max_event: usize,
    /// Data of the current event copied from earlier chunks (its data lines joined with `\n`),
    /// possibly ending in the incomplete line described by `carry`.
    data: Vec<u8>,
    /// Data lines of the current event inside the chunk being read, not copied.
    ranges: Vec<Range<usize>>,
    /// Data lines in the current event (in `data` and in `ranges`).
    lines: usize,
    /// Length of the current event's data so far, lines joined with `\n`.
    len: usize,
    /// A data line of the current event is wanted.
    hit: bool,
    /// The current event outgrew `max_event`: its data is read through this instead of kept
    /// (and the event counts as wanted, its lines not looked at).
    outline: Option<Box<Outline>>,
    /// The line left incomplete at the end of the previous chunk.
    carry: Carry,
    /// The previous chunk ended in CR: a LF starting the next one ends no further line.
    after_cr: bool,
}

/// How the splitter finds, among a chunk's whole events, the last one that makes those before
/// it change nothing: from there on, the events before it are passed over unread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settling {
    /// Where the last candidate in some bytes is (as `candidate` finds the first).
    pub(crate) last_candidate: fn(&[u8]) -> Option<usize>,
    /// Whether an event of this one data line, handed over, makes what the events before it
    /// were handed over for change nothing.
    pub(crate) settles: fn(&[u8]) -> bool,
}

/// What is known about the line left incomplete at the end of the previous chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// No incomplete line: the next byte starts a line.
    LineStart,
    /// A line that is not a data line (or part of a dropped event), not kept.
    Ignored,
    /// Up to 4 bytes, all a prefix of `data`: the field is not known yet.
    Head { bytes: [u8; 4], len: u8 },
    /// A data line, whose value so far is `data[start..]`; `value_start` while a leading space
    /// would still be dropped.
    Data { start: usize, value_start: bool },
}

impl EventSplitter {
    pub(crate) fn new(wanted: fn(&[u8]) -> bool, max_event: usize) -> Self {
        Self {
            wanted,
            candidate: |_| Some(0),
            settling: None,
            handed: 0,
            max_event,
            data: Vec::new(),
            ranges: Vec::new(),
            lines: 0,
            len: 0,
            hit: false,
            outline: None,
            carry: Carry::LineStart,
            after_cr: false,
        }
    }

    /// Sets where the first event worth handing over could be: given the rest of a chunk, a
    /// position such that the events ending before its line may be dropped unread (`None`: all
    /// of the chunk's complete events may). An event read is still handed over only if it has a
    /// wanted data line.
    pub(crate) fn with_candidates(mut self, candidate: fn(&[u8]) -> Option<usize>) -> Self {
        self.candidate = candidate;
        self
    }

    /// Sets how to find the events that settle everything before them.
    pub(crate) fn with_settling(mut self, settling: Settling) -> Self {
        self.settling = Some(settling);
        self
    }

    pub(crate) fn set_max_event(&mut self, max_event: usize) {
        self.max_event = max_event;
    }

    /// Reads `chunk`, calling `on_event` with the data of every event it completes that has a
    /// wanted data line (or, for an event past `max_event`, with its outline if it makes one).
    /// Returns whether `chunk` is known to hold no candidate for one: it began at a line start
    /// outside any wanted event, and the candidate search over all of it found none.
    pub(crate) fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&[u8])) -> bool {
        let mut pos = 0;
        let mut clean = self.carry == Carry::LineStart && !self.hit;
        let mut searched = false;
        // The last settling event is looked for once per chunk (later it would be the same
        // one), once the stream has had two events handed over.
        let mut look_for_settling = self.handed >= 2;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        if self.carry != Carry::LineStart {
            let Some(end) = memchr2(b'\n', b'\r', &chunk[pos..]) else {
                self.extend_carry(&chunk[pos..]);
                return false;
            };
            self.extend_carry(&chunk[pos..pos + end]);
            self.end_carry();
            pos = self.after_line_end(chunk, pos + end);
        }
        loop {
            if !self.hit {
                let found;
                (pos, found) = self.skip_events(chunk, pos, mem::take(&mut look_for_settling));
                clean &= searched || !found;
            }
            searched = true;
            // The lines of the next event, up to its blank line.
            let mut event_ended = false;
            while let Some(len) = memchr2(b'\n', b'\r', &chunk[pos..]) {
                let end = pos + len;
                self.line(chunk, pos..end, &mut on_event);
                pos = self.after_line_end(chunk, end);
                if len == 0 {
                    event_ended = true;
                    break;
                }
            }
            if !event_ended {
                break;
            }
        }
        self.spill(chunk);
        self.extend_carry(&chunk[pos..]);
        clean
    }

    /// From the line start `pos`, with no wanted line in the current event: passes over the
    /// whole events before the first candidate, or before the last event that settles them
    /// (their lines unread), and returns where reading resumes and whether there was a
    /// candidate.
    fn skip_events(&mut self, chunk: &[u8], pos: usize, settling: bool) -> (usize, bool) {
        let rest = &chunk[pos..];
        let candidate = (self.candidate)(rest);
        if let (Some(first), Some(how), true) = (candidate, self.settling, settling)
            && let Some((start, settles)) = self.last_candidate_event(rest, first, how)
        {
            if settles {
                // The current event, and all after it up to `start`, change nothing.
                self.reset_event();
                return (pos + start, true);
            }
            self.settling = None;
        }
        let limit = match candidate {
            // Up to the start of the candidate's line.
            Some(at) => memrchr2(b'\n', b'\r', &rest[..at]).map_or(0, |t| t + 1),
            None => rest.len(),
        };
        let Some(end) = last_blank_line_end(&rest[..limit]) else {
            return (pos, candidate.is_some());
        };
        // The current event, and any after it up to `end`, had no wanted line.
        self.reset_event();
        if pos + end == chunk.len() && chunk[chunk.len() - 1] == b'\r' {
            self.after_cr = true;
        }
        (pos + end, candidate.is_some())
    }

    /// Ends the stream: an event cut off without its blank line still counts.
    pub(crate) fn finish(&mut self, on_event: impl FnMut(&[u8])) {
        if self.carry != Carry::LineStart {
            self.end_carry();
        }
        self.after_cr = false;
        self.dispatch(&[], on_event);
    }

    /// Capacity held for the parts of events spanning chunks.
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Where the next line starts after the line end at `at`.
    fn after_line_end(&mut self, chunk: &[u8], at: usize) -> usize {
        if at + 1 == chunk.len() && chunk[at] == b'\r' {
            // Its LF, if any, starts the next chunk.
            self.after_cr = true;
        }
        next_line_start(chunk, at)
    }

    /// A line wholly inside `chunk`.
    fn line(&mut self, chunk: &[u8], line: Range<usize>, on_event: impl FnMut(&[u8])) {
        if line.is_empty() {
            self.dispatch(chunk, on_event);
            return;
        }
        let Some(offset) = data_value_offset(&chunk[line.clone()]) else {
            return;
        };
        let value = line.start + offset..line.end;
        let separator = self.begin_data_line(chunk, value.len());
        if let Some(outline) = &mut self.outline {
            if separator {
                outline.feed(b"\n");
            }
            outline.feed(&chunk[value]);
            return;
        }
        if !self.hit && (self.wanted)(&chunk[value.clone()]) {
            self.hit = true;
        }
        self.ranges.push(value);
        if self.ranges.len() >= MAX_RANGES {
            self.spill(chunk);
        }
    }

    /// Counts a data line of `value_len` bytes into the event, which is read through an
    /// outline from there if that makes it too large; returns whether a separator goes before
    /// the line. `chunk` holds the event's lines not yet copied.
    fn begin_data_line(&mut self, chunk: &[u8], value_len: usize) -> bool {
        let separator = self.lines > 0;
        self.len = self.len.saturating_add(value_len + usize::from(separator));
        if self.len > self.max_event {
            self.begin_outline(chunk);
        }
        self.lines += 1;
        separator
    }

    /// From here the current event's data goes through an outline, starting with what was kept.
    fn begin_outline(&mut self, chunk: &[u8]) {
        if self.outline.is_some() {
            return;
        }
        self.spill(chunk);
        let mut outline = Box::<Outline>::default();
        outline.feed(&self.data);
        self.outline = Some(outline);
        self.hit = true;
        self.data.clear();
        self.data.shrink_to(KEEP_CAPACITY);
    }

    /// Blank line: the event is complete.
    fn dispatch(&mut self, chunk: &[u8], mut on_event: impl FnMut(&[u8])) {
        if let Some(outline) = &self.outline {
            if let Some(document) = outline.finish() {
                on_event(document);
            }
        } else if self.hit {
            let data = if self.lines == 1 && self.ranges.len() == 1 {
                &chunk[self.ranges[0].clone()]
            } else {
                self.spill(chunk);
                &self.data
            };
            on_event(data);
            self.handed = self.handed.saturating_add(1).min(2);
        }
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.data.clear();
        if self.data.capacity() > KEEP_CAPACITY {
            self.data.shrink_to(KEEP_CAPACITY);
        }
        self.ranges.clear();
        self.lines = 0;
        self.len = 0;
        self.hit = false;
        self.outline = None;
    }

    /// Copies the in-chunk data lines of the current event into `data`.
    fn spill(&mut self, chunk: &[u8]) {
        // Lines are joined with `\n`: one goes before every line but the event's first.
        let mut separate = self.lines > self.ranges.len();
        for range in self.ranges.drain(..) {
            if separate {
                extend_bounded(&mut self.data, b"\n", self.max_event);
            }
            extend_bounded(&mut self.data, &chunk[range], self.max_event);
            separate = true;
        }
    }

    /// More bytes (no line end among them) of the incomplete line.
    fn extend_carry(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.carry {
            Carry::Ignored => {}
            Carry::LineStart => self.classify(&[], bytes),
            Carry::Head { bytes: head, len } => self.classify(&head[..usize::from(len)], bytes),
            Carry::Data { .. } => self.append_data(bytes),
        }
    }

    /// Starts reading a line from its first bytes, `head` (carried) then `bytes`.
    fn classify(&mut self, head: &[u8], bytes: &[u8]) {
        const FIELD: &[u8] = b"data:";
        let seen = head.len() + bytes.len();
        if seen < FIELD.len() {
            let mut prefix = [0; 4];
            prefix[..head.len()].copy_from_slice(head);
            prefix[head.len()..seen].copy_from_slice(bytes);
            self.carry = if FIELD.starts_with(&prefix[..seen]) {
                Carry::Head {
                    bytes: prefix,
                    len: seen as u8,
                }
            } else {
                Carry::Ignored
            };
            return;
        }
        // `head` is a prefix of `data` (or empty): `bytes` must complete the field name.
        let rest = FIELD.len() - head.len();
        if bytes[..rest] != FIELD[head.len()..] {
            self.carry = Carry::Ignored;
            return;
        }
        self.begin_carried_data_line();
        self.append_data(&bytes[rest..]);
    }

    /// A data line that continues past the chunk: its value goes straight into `data` (or
    /// the outline). The event's lines in the chunk were copied already.
    fn begin_carried_data_line(&mut self) {
        if self.begin_data_line(&[], 0) {
            self.push_data(b"\n");
        }
        self.carry = Carry::Data {
            start: self.data.len(),
            value_start: true,
        };
    }

    fn append_data(&mut self, mut bytes: &[u8]) {
        let Carry::Data { start, value_start } = self.carry else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        if value_start {
            bytes = bytes.strip_prefix(b" ").unwrap_or(bytes);
            self.carry = Carry::Data {
                start,
                value_start: false,
            };
        }
        self.len = self.len.saturating_add(bytes.len());
        if self.len > self.max_event {
            self.begin_outline(&[]);
        }
        self.push_data(bytes);
    }

    /// Bytes of the current event's data, copied or read through its outline.
    fn push_data(&mut self, bytes: &[u8]) {
        match &mut self.outline {
            Some(outline) => outline.feed(bytes),
            None => extend_bounded(&mut self.data, bytes, self.max_event),
        }
    }

    /// The incomplete line has ended.
    fn end_carry(&mut self) {
        if let Carry::Head { bytes, len } = self.carry
            && bytes[..usize::from(len)] == *b"data"
        {
            // `data` alone: an empty data line.
            self.begin_carried_data_line();
        }
        if let Carry::Data { start, .. } = mem::replace(&mut self.carry, Carry::LineStart)
            && !self.hit
            && (self.wanted)(&self.data[start..])
        {
            self.hit = true;
        }
    }

    /// In bytes that start at a line start, whose first candidate is at `first`: the start of
    /// the last whole event with a candidate, if it comes after the event of `first` and has
    /// one data line that would be handed over whole (wanted, and within `max_event`), and
    /// whether it settles the ones before it.
    fn last_candidate_event(
        &self,
        bytes: &[u8],
        first: usize,
        settling: Settling,
    ) -> Option<(usize, bool)> {
        let whole = &bytes[..last_blank_line_end(bytes)?];
        let at = (settling.last_candidate)(whole)?;
        let line_start = memrchr2(b'\n', b'\r', &whole[..at]).map_or(0, |t| t + 1);
        let start = last_blank_line_end(&whole[..line_start])?;
        if start <= first {
            // No event with a candidate before it to pass over.
            return None;
        }
        // Its one data line, up to its blank line.
        let mut data = None;
        let mut pos = start;
        loop {
            let len = memchr2(b'\n', b'\r', &whole[pos..])?;
            let line = &whole[pos..pos + len];
            if line.is_empty() {
                break;
            }
            if let Some(offset) = data_value_offset(line) {
                if data.is_some() {
                    return None;
                }
                data = Some(&line[offset..]);
            }
            pos = next_line_start(whole, pos + len);
        }
        let data = data.filter(|d| d.len() <= self.max_event && (self.wanted)(d))?;
        Some((start, (settling.settles)(data)))
    }
}

/// Where the next line starts after the line end at `at` (a CRLF is one line end).
fn next_line_start(bytes: &[u8], at: usize) -> usize {
    if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') {
        at + 2
    } else {
        at + 1
    }
}

/// In bytes that start at a line start: the end of the last empty line (its line end
/// included), or `None` if there is none.
fn last_blank_line_end(bytes: &[u8]) -> Option<usize> {
    let mut end = bytes.len();
    while let Some(t) = memrchr2(b'\n', b'\r', &bytes[..end]) {
        // The line end's first byte (a CRLF is one line end).
        let start = if bytes[t] == b'\n' && t > 0 && bytes[t - 1] == b'\r' {
            t - 1
        } else {
            t
        };
        // The line it ends is empty if it starts right there.
        if start == 0 || matches!(bytes[start - 1], b'\n' | b'\r') {
            return Some(t + 1);
        }
        end = start;
    }
    None
}

/// Where the value of a data line starts, or `None` for any other line.
fn data_value_offset(line: &[u8]) -> Option<usize> {
    match line.strip_prefix(b"data")? {
        [] => Some(4),
        [b':', b' ', ..] => Some(6),
        [b':', ..] => Some(5),
        _ => None,
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn any(_: &[u8]) -> bool {
        true
    }

    fn usage(line: &[u8]) -> bool {
        memchr::memmem::find(line, b"\"usage").is_some()
    }

    fn split_with(wanted: fn(&[u8]) -> bool, max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = EventSplitter::new(wanted, max);
        let mut events = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, |data| {
                events.push(String::from_utf8(data.to_vec()).unwrap())
            });
        }
        splitter.finish(|data| events.push(String::from_utf8(data.to_vec()).unwrap()));
        events
    }

    fn usage_at(bytes: &[u8]) -> Option<usize> {
        memchr::memmem::find(bytes, b"\"usage")
    }

    #[test]
    fn skipping_events_before_candidates_changes_nothing() {
        // Line ends of every kind, an event whose usage is on its second data line, comments,
        // a CR at what may be a chunk's end, and events of only blank lines.
        let input: &[u8] = b"data: a\r\n\r\ndata: b\n\n: c\rdata: x\ndata: {\"usage\":1}\n\n\r\r\
            data: d\r\rdata: {\"usage\"\r\n\ndata: e\n\rdata: \"usage\n\r\ndata: f";
        let plain = |chunks: &[&[u8]]| split_with(usage, 1 << 20, chunks);
        let skipping = |chunks: &[&[u8]]| {
            let mut splitter = EventSplitter::new(usage, 1 << 20).with_candidates(usage_at);
            let mut events = Vec::new();
            for chunk in chunks {
                let clean = splitter.feed(chunk, |d| {
                    events.push(String::from_utf8(d.to_vec()).unwrap())
                });
                assert!(!clean || usage_at(chunk).is_none(), "{chunk:?}");
            }
            splitter.finish(|d| events.push(String::from_utf8(d.to_vec()).unwrap()));
            events
        };
        let want = plain(&[input]);
        assert_eq!(want.len(), 3, "{want:?}");
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let chunks = [&input[..i], &input[i..j], &input[j..]];
                assert_eq!(skipping(&chunks), want, "chunks cut at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_chunk_is_clean_when_searched_whole_without_a_candidate() {
        let mut splitter = EventSplitter::new(usage, 1 << 20).with_candidates(usage_at);
        let mut events = 0;
        let mut feed = |chunk: &[u8]| splitter.feed(chunk, |_| events += 1);
        assert!(feed(b"data: a\n\ndata: b\n\n"));
        assert!(!feed(b"data: {\"usage\":1}\n\n"));
        // Then one that starts inside a line (its start was not searched with it).
        assert!(feed(b"data: c"));
        assert!(!feed(b"d\n\n"));
        assert!(feed(b"data: e\n"));
        // Inside an event with a wanted line.
        assert!(!feed(b"data: {\"usage\":2}\n"));
        assert!(!feed(b"data: f\n\n"));
        assert_eq!(events, 2);
    }

    #[test]
    fn last_blank_line_end_finds_every_kind_of_blank_line() {
        assert_eq!(last_blank_line_end(b""), None);
        assert_eq!(last_blank_line_end(b"\n"), Some(1));
        assert_eq!(last_blank_line_end(b"a\n"), None);
        assert_eq!(last_blank_line_end(b"a\n\nb\n"), Some(3));
        assert_eq!(last_blank_line_end(b"a\r\n\r\nb"), Some(5));
        assert_eq!(last_blank_line_end(b"a\r\rb\r\n"), Some(3));
        assert_eq!(last_blank_line_end(b"a\n\r\nb"), Some(4));
    }

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        split_with(any, 1 << 20, chunks)
    }

    /// Every way of cutting `input` in up to three chunks gives `expected`.
    fn assert_any_chunking(input: &[u8], expected: &[&str]) {
        assert_eq!(split(&[input]), expected, "whole input");
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let got = split(&[&input[..i], &input[i..j], &input[j..]]);
                assert_eq!(got, expected, "chunks cut at {i} and {j}");
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split(&bytes), expected, "1-byte chunks");
    }

    #[test]
    fn line_ends_lf_crlf_cr() {
        let expected = ["a", "b", "c"];
        assert_any_chunking(b"data: a\n\ndata: b\n\ndata: c\n\n", &expected);
        assert_any_chunking(b"data: a\r\n\r\ndata: b\r\n\r\ndata: c\r\n\r\n", &expected);
        assert_any_chunking(b"data: a\r\rdata: b\r\rdata: c\r\r", &expected);
        assert_any_chunking(b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n", &expected);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // Were the LF a second line end, "a" and "b" would be two events.
        assert_eq!(
            split(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]),
            ["a\nb"]
        );
        assert_eq!(split(&[b"data: a\r", b"\n", b"\r\n"]), ["a"]);
        // A CR alone at a chunk end, then another line.
        assert_eq!(split(&[b"data: a\r", b"data: b\r\r"]), ["a\nb"]);
        // An empty chunk in between keeps the pending CR.
        assert_eq!(split(&[b"data: a\r", b"", b"\ndata: b\n\n"]), ["a\nb"]);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_any_chunking(
            b"data: {\"a\":\ndata:  1,\ndata\ndata:\"b\":2}\n\n",
            &["{\"a\":\n 1,\n\n\"b\":2}"],
        );
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        assert_any_chunking(
            b": keep-alive\n\nevent: message_start\nid: 7\nretry: 1000\ndata: x\n: note\ndatum: y\ndata : z\nDATA: w\n\n:\n\n",
            &["x"],
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        assert_any_chunking(b"event: ping\n\n\n\n\nid: 1\n\ndata: x\n\n", &["x"]);
    }

    #[test]
    fn trailing_event_without_blank_line_is_flushed() {
        assert_any_chunking(b"data: a\n\ndata: b", &["a", "b"]);
        assert_any_chunking(b"data: a\n\ndata: b\ndata: c\r", &["a", "b\nc"]);
        assert_eq!(split(&[b"data"]), [""]);
        assert_eq!(split(&[b"dat"]), Vec::<String>::new());
    }

    #[test]
    fn only_wanted_events_are_dispatched() {
        let input = b"data: {\"usage\":null}\n\ndata: {\"x\":1}\n\ndata: {\"x\":1,\ndata: \"usage\":{}}\n\n";
        let expected = ["{\"usage\":null}", "{\"x\":1,\n\"usage\":{}}"];
        assert_eq!(split_with(usage, 1 << 20, &[input]), expected);
        for i in 0..=input.len() {
            assert_eq!(
                split_with(usage, 1 << 20, &[&input[..i], &input[i..]]),
                expected,
                "cut at {i}"
            );
        }
    }

    #[test]
    fn oversize_event_is_skipped_then_next_event_parsed() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let input = format!("data: small\n\n{big}data: after\n\n");
        let input = input.as_bytes();
        for i in 0..=input.len() {
            let got = split_with(any, 50, &[&input[..i], &input[i..]]);
            assert_eq!(got, ["small", "after"], "cut at {i}");
        }
        // Many lines, each small, adding up past the cap.
        let lines = "data: 0123456789\n".repeat(10);
        let input = format!("{lines}\ndata: after\n\n");
        assert_eq!(split_with(any, 50, &[input.as_bytes()]), ["after"]);
        // Exactly at the cap is kept: 4 lines of 10, one of 7 and 4 separators make 51 bytes.
        let input = b"data: 0123456789\ndata: 0123456789\ndata: 0123456789\ndata: 0123456789\ndata: 1234567\n\n";
        let kept = split_with(any, 51, &[input]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].len(), 51);
        assert!(split_with(any, 50, &[input]).is_empty());
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split_with(any, 51, &bytes), kept);
        assert!(split_with(any, 50, &bytes).is_empty());
    }

    #[test]
    fn oversize_event_inside_one_chunk_is_not_copied() {
        let input = format!("data: {}\n\ndata: ok\n\n", "y".repeat(10_000));
        let mut splitter = EventSplitter::new(any, 100);
        let mut events = Vec::new();
        splitter.feed(input.as_bytes(), |d| events.push(d.to_vec()));
        assert_eq!(events, [b"ok".to_vec()]);
        assert_eq!(splitter.buffered_capacity(), 0);
        assert!(splitter.ranges.capacity() <= MAX_RANGES);
    }

    #[test]
    fn fifty_megabyte_event_keeps_memory_bounded() {
        const CAP: usize = 1 << 20;
        const CHUNK: usize = 64 * 1024;
        let mut splitter = EventSplitter::new(usage, CAP);
        let mut events = Vec::new();
        let line = {
            let mut line = b"data: {\"usage\":{\"prompt_tokens\":1},\"pad\":\"".to_vec();
            line.resize(50 << 20, b'z');
            line.extend_from_slice(b"\"}\n\n");
            line
        };
        let mut max_capacity = 0;
        for (i, chunk) in line.chunks(CHUNK).enumerate() {
            splitter.feed(chunk, |d| {
                events.push(String::from_utf8_lossy(d).into_owned())
            });
            max_capacity = max_capacity.max(splitter.buffered_capacity());
            let bound = if (i + 1) * CHUNK > CAP + CHUNK {
                // Read through its outline since it passed the cap.
                KEEP_CAPACITY
            } else {
                CAP + CHUNK
            };
            let capacity = splitter.buffered_capacity();
            assert!(capacity <= bound, "buffer grew to {capacity} at chunk {i}");
        }
        assert!(max_capacity > 0, "the event was never buffered");
        splitter.feed(b"data: {\"usage\":{}}\n\n", |d| {
            events.push(String::from_utf8_lossy(d).into_owned())
        });
        assert_eq!(
            events,
            [r#"{"usage":{"prompt_tokens":1}}"#, r#"{"usage":{}}"#],
            "the oversize event was dispatched as its outline"
        );
        assert!(splitter.buffered_capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn many_empty_data_lines_keep_ranges_small() {
        let input = format!("{}\n", "data\n".repeat(10_000));
        let mut splitter = EventSplitter::new(any, 1 << 20);
        let mut events = Vec::new();
        splitter.feed(input.as_bytes(), |d| events.push(d.len()));
        assert_eq!(events, [9_999]);
        assert!(splitter.ranges.capacity() <= MAX_RANGES * 2);
    }
}
