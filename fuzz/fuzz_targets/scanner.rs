//! The usage scanner and every usage parser, over any bytes in any framing: no panic, memory
//! bounded by the event cap, and the same usage whatever the framing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_token_ratelimit::usage::{BodyFormat, UsageScanner};

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    for format in [BodyFormat::Sse, BodyFormat::Json] {
        let mut whole = UsageScanner::new(format).with_max_event_bytes(4096);
        whole.feed(body);
        let expected = whole.finish();
        // The same bytes in frames of a length chosen by the first byte.
        let mut framed = UsageScanner::new(format).with_max_event_bytes(4096);
        for chunk in body.chunks(usize::from(split % 64) + 1) {
            framed.feed(chunk);
        }
        assert_eq!(framed.finish(), expected, "framing changed the usage");
    }
});
