//! The members of a JSON object that a usage is read from, picked out of a document too large
//! to keep, as it passes.
//!
//! An SSE event past the cap (an image generation's `response.completed`, which repeats the
//! image; a Gemini chunk carrying one) is fed to an [`Outline`] instead of being kept. It
//! follows the object's structure (strings passed over with memchr) and keeps, verbatim, only
//! its top-level `type`, `usage` and `usageMetadata` members and the `usage` member of a
//! top-level `message` or `response` object: every place a usage is read from. What it makes
//! is a small JSON object that reads to the same usage as the whole document would, for an
//! object whose top-level keys are written without escapes (as providers write them: a key
//! with an escape is read as none of the kept ones, where a whole parse would decode it).
//!
//! Only what it keeps is parsed later: a document malformed elsewhere may be read where
//! parsing it whole would give up. Whitespace between tokens is not kept; what follows the
//! object is ignored, as a whole parse ignores it. A document that is not an object, that ends
//! early, or whose kept members exceed 64 KiB reports nothing.

use memchr::{memchr2, memchr3};

/// Most bytes kept; past this the document reports nothing.
const MAX_KEPT: usize = 64 * 1024;

/// Longest key compared (`usageMetadata`); longer keys, and keys written with escapes, are
/// read as none of the kept ones.
const MAX_KEY: usize = 13;

#[derive(Debug, Clone)]
pub(crate) struct Outline {
    /// The outline made so far.
    out: Vec<u8>,
    state: State,
    /// Objects and arrays open, the top-level object being the first.
    depth: usize,
    /// The depth whose members are read: 1, or 2 inside a top-level `message` or `response`.
    level: usize,
    /// What comes next among the members at `level`.
    expect: Expect,
    string: Str,
    /// The last key read at `level` (`key_len > MAX_KEY`: none of the kept ones).
    key: [u8; MAX_KEY],
    key_len: usize,
    /// The value being read is copied to `out`.
    keeping: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level object.
    Before,
    Inside,
    /// After the top-level object: the rest is ignored.
    Done,
    /// Not an object, malformed where it was read, or too much kept: reports nothing.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Just after `{`: a key or `}`.
    FirstKey,
    /// After `,`: a key.
    Key,
    Colon,
    Value,
    /// In a member's value or after it: `,` or `}` at `level` ends it.
    Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    Outside,
    /// Inside a string; `key` if it is a key at `level`.
    Inside {
        key: bool,
    },
    /// Just after a backslash inside a string.
    Escape {
        key: bool,
    },
}

/// What is done with the value of a member at `level`.
enum Member {
    Skip,
    Keep,
    /// `message` or `response`: an object whose own `usage` is kept.
    Parent,
}

impl Default for Outline {
    fn default() -> Self {
        Self {
            out: Vec::new(),
            state: State::Before,
            depth: 0,
            level: 1,
            expect: Expect::FirstKey,
            string: Str::Outside,
            key: [0; MAX_KEY],
            key_len: 0,
            keeping: false,
        }
    }
}

impl Outline {
    /// Reads the next bytes of the document.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.state != State::Broken {
            match self.string {
                Str::Escape { key } => {
                    // The escaped byte (`"`, `\`, or the `u` of `\uXXXX`) ends no string.
                    self.string = Str::Inside { key };
                    self.keep(&bytes[..1]);
                    bytes = &bytes[1..];
                }
                Str::Inside { key } => {
                    let Some(at) = memchr2(b'"', b'\\', bytes) else {
                        self.string_bytes(bytes, key);
                        return;
                    };
                    self.string_bytes(&bytes[..at], key);
                    self.keep(&bytes[at..=at]);
                    if bytes[at] == b'\\' {
                        if key {
                            // An escaped key is compared to none.
                            self.key_len = MAX_KEY + 1;
                        }
                        self.string = Str::Escape { key };
                    } else {
                        self.string = Str::Outside;
                        if key {
                            self.expect = Expect::Colon;
                        }
                    }
                    bytes = &bytes[at + 1..];
                }
                Str::Outside => {
                    if self.state == State::Inside && self.depth != self.level && !self.keeping {
                        bytes = &bytes[skip_to_structure(bytes)..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    self.structure(bytes[0]);
                    bytes = &bytes[1..];
                }
            }
        }
    }

    /// The outline of the whole document, if it is an object that ended and nothing went
    /// wrong; call once every byte has been fed.
    pub(crate) fn finish(&self) -> Option<&[u8]> {
        (self.state == State::Done).then_some(&self.out[..])
    }

    /// A byte outside any string.
    fn structure(&mut self, byte: u8) {
        let whitespace = matches!(byte, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            State::Before if whitespace => return,
            State::Before if byte == b'{' => {
                self.state = State::Inside;
                self.depth = 1;
                self.out.push(b'{');
                return;
            }
            State::Before => {
                self.state = State::Broken;
                return;
            }
            State::Inside => {}
            State::Done | State::Broken => return,
        }
        if whitespace {
            // Not kept: it would count against the bound for nothing.
            return;
        }
        if self.depth != self.level {
            // Inside a member's value.
            match byte {
                b'"' => self.string = Str::Inside { key: false },
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => self.depth -= 1,
                _ => {}
            }
            self.keep(&[byte]);
            return;
        }
        match (self.expect, byte) {
            (Expect::FirstKey | Expect::Key, b'"') => {
                self.key_len = 0;
                self.string = Str::Inside { key: true };
            }
            (Expect::Colon, b':') => self.expect = Expect::Value,
            (Expect::FirstKey | Expect::Next, b'}') => self.close(),
            (Expect::Next, b',') => {
                self.keeping = false;
                self.expect = Expect::Key;
            }
            // A scalar's next byte; anything else here is out of place.
            (Expect::Next, b'"' | b'{' | b'[' | b']' | b':') => self.state = State::Broken,
            (Expect::Next, _) => self.keep(&[byte]),
            (Expect::Value, b'}' | b']' | b',' | b':') => self.state = State::Broken,
            (Expect::Value, _) => self.value(byte),
            _ => self.state = State::Broken,
        }
    }

    /// The first byte of a member's value at `level`.
    fn value(&mut self, byte: u8) {
        self.expect = Expect::Next;
        let member = match (self.level, &self.key[..self.key_len.min(MAX_KEY)]) {
            _ if self.key_len > MAX_KEY => Member::Skip,
            (1, b"type" | b"usage" | b"usageMetadata") | (2, b"usage") => Member::Keep,
            (1, b"message" | b"response") => Member::Parent,
            _ => Member::Skip,
        };
        match member {
            Member::Skip => {}
            Member::Parent if byte == b'{' => {
                // Its members are read in turn; only `usage` is kept.
                self.write_key();
                self.write(b"{");
                self.depth += 1;
                self.level = 2;
                self.expect = Expect::FirstKey;
                return;
            }
            // Not an object: read as none, kept as `null` so that a repeated key still fails.
            Member::Parent => {
                self.write_key();
                self.write(b"null");
            }
            Member::Keep => {
                self.write_key();
                self.keeping = true;
            }
        }
        match byte {
            b'"' => self.string = Str::Inside { key: false },
            b'{' | b'[' => self.depth += 1,
            _ => {}
        }
        self.keep(&[byte]);
    }

    /// `}` at `level`: the end of a `message` or `response`, or of the document.
    fn close(&mut self) {
        self.keeping = false;
        self.write(b"}");
        self.depth -= 1;
        if self.level == 2 {
            self.level = 1;
            self.expect = Expect::Next;
        } else {
            self.state = State::Done;
        }
    }

    /// `"key":` for a member kept, after a comma unless it is its object's first.
    fn write_key(&mut self) {
        if self.out.last() != Some(&b'{') {
            self.write(b",");
        }
        let key = self.key;
        self.write(b"\"");
        self.write(&key[..self.key_len]);
        self.write(b"\":");
    }

    /// Bytes inside a string, up to its next quote or backslash.
    fn string_bytes(&mut self, bytes: &[u8], key: bool) {
        if key {
            if let Some(room) = self.key.get_mut(self.key_len..self.key_len + bytes.len()) {
                room.copy_from_slice(bytes);
                self.key_len += bytes.len();
            } else {
                self.key_len = MAX_KEY + 1;
            }
        }
        self.keep(bytes);
    }

    /// Bytes of a value kept.
    fn keep(&mut self, bytes: &[u8]) {
        if self.keeping {
            self.write(bytes);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.state == State::Broken {
            return;
        }
        if self.out.len() + bytes.len() > MAX_KEPT {
            self.state = State::Broken;
            self.out = Vec::new();
            return;
        }
        self.out.extend_from_slice(bytes);
    }
}

/// Where the next string or bracket is in `bytes` (its length if none): inside a value passed
/// over, nothing else matters. Looked for byte by byte a little way, then with memchr over
/// long runs without any (an embedding's thousands of numbers).
fn skip_to_structure(bytes: &[u8]) -> usize {
    const NEAR: usize = 32;
    let is_structure = |b: &u8| matches!(b, b'"' | b'{' | b'}' | b'[' | b']');
    let near = &bytes[..bytes.len().min(NEAR)];
    if let Some(at) = near.iter().position(is_structure) {
        return at;
    }
    let rest = &bytes[near.len()..];
    let found = match (memchr3(b'"', b'[', b']', rest), memchr2(b'{', b'}', rest)) {
        (Some(a), Some(b)) => a.min(b),
        (Some(at), None) | (None, Some(at)) => at,
        (None, None) => rest.len(),
    };
    near.len() + found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outline(document: &[u8], chunk: usize) -> Option<String> {
        let mut outline = Outline::default();
        for part in document.chunks(chunk.max(1)) {
            outline.feed(part);
        }
        outline
            .finish()
            .map(|out| String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn keeps_only_the_members_usage_is_read_from() {
        let cases: [(&str, Option<&str>); 12] = [
            (
                r#"{"type":"response.completed","sequence_number":9,"response":{"id":"r","output":[{"type":"image_generation_call","result":"iVBOR\"w0\\"}],"usage":{"input_tokens":2,"output_tokens":3,"total_tokens":5},"user":null},"x":1}"#,
                Some(
                    r#"{"type":"response.completed","response":{"usage":{"input_tokens":2,"output_tokens":3,"total_tokens":5}}}"#,
                ),
            ),
            (
                r#" { "candidates" : [ {"content":{"parts":[{"inlineData":{"data":"AAAA"}}],"usage":{"total_tokens":1}}} ] , "usageMetadata" : {"promptTokenCount": 9 , "totalTokenCount":12} , "modelVersion":"m" } "#,
                Some(r#"{"usageMetadata":{"promptTokenCount":9,"totalTokenCount":12}}"#),
            ),
            (
                r#"{"type":"message_start","message":{"content":[{"usage":{"input_tokens":666}}],"usage":{"input_tokens":4}}}"#,
                Some(r#"{"type":"message_start","message":{"usage":{"input_tokens":4}}}"#),
            ),
            // Nested `usage` keys, a key that only starts like a kept one, one escaped.
            (
                r#"{"a":{"usage":{"total_tokens":1}},"usages":{},"us\u0061ge":{"total_tokens":2},"b":[{"response":{}}]}"#,
                Some("{}"),
            ),
            // A response that is not an object, and a repeated key, kept so as to fail alike.
            (
                r#"{"response":"big","usage":null,"usage":{}}"#,
                Some(r#"{"response":null,"usage":null,"usage":{}}"#),
            ),
            ("{}", Some("{}")),
            (
                r#"{"usage":{"total_tokens":1}}"#,
                Some(r#"{"usage":{"total_tokens":1}}"#),
            ),
            (r#"[{"usage":{"total_tokens":1}}]"#, None),
            (r#"{"usage":{"total_tokens":1}"#, None),
            // What follows the object is ignored, as serde_json's reader of one value does.
            (
                r#"{"usage":{"total_tokens":1}} x"#,
                Some(r#"{"usage":{"total_tokens":1}}"#),
            ),
            (r#"{"usage":,"x":1}"#, None),
            (r#"{"a" 1}"#, None),
        ];
        for (document, want) in cases {
            for chunk in [1, 2, 3, 7, document.len()] {
                assert_eq!(
                    outline(document.as_bytes(), chunk).as_deref(),
                    want,
                    "{document} in {chunk}-byte parts"
                );
            }
        }
    }

    #[test]
    fn a_huge_document_keeps_little() {
        let mut outline = Outline::default();
        outline.feed(br#"{"type":"response.completed","response":{"output":[{"result":""#);
        let image = vec![b'A'; 1 << 20];
        for _ in 0..8 {
            outline.feed(&image);
        }
        outline.feed(br#""}],"usage":{"total_tokens":7}}}"#);
        assert_eq!(
            outline.finish(),
            Some(&br#"{"type":"response.completed","response":{"usage":{"total_tokens":7}}}"#[..])
        );
        assert!(outline.out.capacity() < 1024);
    }

    proptest::proptest! {
        /// Any bytes, in any parts: no panic, and the outline stays within its bound.
        #[test]
        fn any_bytes_are_read_without_panic(
            bytes in proptest::collection::vec(proptest::sample::select(b"{}[]\":,\\ usage01type\xff".to_vec()), 0..300),
            part in 1usize..40,
        ) {
            let mut outline = Outline::default();
            for piece in bytes.chunks(part) {
                outline.feed(piece);
                proptest::prop_assert!(outline.out.len() <= MAX_KEPT);
            }
            let _ = outline.finish();
        }
    }

    #[test]
    fn kept_members_are_bounded() {
        let mut document = br#"{"usage":{"pad":""#.to_vec();
        document.resize(MAX_KEPT + 10, b'x');
        document.extend_from_slice(br#""}}"#);
        assert_eq!(outline(&document, 4096), None);
        // Members kept as `null`, repeated.
        let mut document = b"{".to_vec();
        for _ in 0..10_000 {
            document.extend_from_slice(br#""response":1,"#);
        }
        document.extend_from_slice(b"\"x\":1}");
        let mut outline = Outline::default();
        outline.feed(&document);
        assert_eq!(outline.finish(), None);
        assert!(outline.out.capacity() <= MAX_KEPT);
    }
}
