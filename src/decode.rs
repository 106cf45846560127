//! A side copy of a compressed response body, decoded for metering only: the client still
//! receives the encoded bytes. (Higress skips compressed bodies and never charges them.)
//!
//! A hostile upstream can send a "zip bomb": a few KiB that decode to gigabytes. Memory stays
//! bounded whatever the compression ratio: the decoded bytes are handed on in pieces of a few
//! tens of KiB and never collected, so a decoder holds only its window (32 KiB for gzip and
//! deflate, at most 8 MiB for zstd and 16 MiB for brotli) and one piece. The CPU is bounded
//! too: past [`MAX_RATIO`] decoded bytes per encoded byte (beyond the first
//! [`FREE_DECODED`]), decoding stops and the usage is unknown, so a megabyte of zstd cannot
//! make the layer decode and scan tens of gigabytes. Real LLM streams compress 5 to 50 times.

use std::io::Write;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use zstd::stream::raw::{DParameter, InBuffer, Operation, OutBuffer};

/// Decoded bytes allowed per encoded byte, past [`FREE_DECODED`].
const MAX_RATIO: u64 = 1024;

/// Decoded bytes allowed whatever the ratio.
const FREE_DECODED: u64 = 64 << 20;

/// The output buffer of the zstd and brotli decoders: the largest piece they hand on at once.
const OUT: usize = 32 * 1024;

/// The largest zstd window accepted: 8 MiB, the limit RFC 9659 sets for `Content-Encoding:
/// zstd` (the library's default, 128 MiB, would let one response pin that much).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A streaming decoder for one `Content-Encoding`.
pub(crate) struct Decoder {
    kind: Kind,
    /// Set after a decoding error, at the end of a brotli stream, or past the decoded-size
    /// cap: input is then ignored.
    stopped: bool,
    /// Bytes fed and bytes handed on, for the cap.
    encoded: u64,
    decoded: u64,
}

enum Kind {
    /// flate2's writers decode into the `Vec`, drained after every `write` (see [`flate`]).
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// HTTP `deflate` is the zlib format; some servers send raw deflate, recognised by its
    /// first bytes not being a zlib header.
    Deflate(Option<DeflateKind>, Vec<u8>),
    Brotli(Box<Brotli>),
    Zstd(Box<Zstd>),
}

enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

/// Brotli as in RFC 7932: windows up to 16 MiB. The library's large-window extension (up to
/// 1 GiB) is not HTTP's `br` and is refused.
struct Brotli {
    state: BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>,
    total_out: usize,
    out: Box<[u8]>,
}

struct Zstd {
    decoder: zstd::stream::raw::Decoder<'static>,
    out: Box<[u8]>,
}

/// What a `Content-Encoding` means for metering.
pub(crate) enum Encoding {
    /// No encoding: scan the bytes as they are.
    Identity,
    /// One encoding this module decodes.
    Decode(Box<Decoder>),
    /// Several, or one not known here: usage cannot be read (the estimate applies).
    Unsupported,
}

impl Encoding {
    pub(crate) fn from_header(value: Option<&[u8]>) -> Self {
        let Some(value) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
            return if value.is_some() {
                Self::Unsupported
            } else {
                Self::Identity
            };
        };
        let codings: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
            .collect();
        let kind = match codings.as_slice() {
            [] => return Self::Identity,
            [c] if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
                Kind::Gzip(flate2::write::MultiGzDecoder::new(Vec::new()))
            }
            [c] if c.eq_ignore_ascii_case("deflate") => Kind::Deflate(None, Vec::new()),
            [c] if c.eq_ignore_ascii_case("br") => Kind::Brotli(Box::new(Brotli {
                state: BrotliState::new_strict(
                    StandardAlloc::default(),
                    StandardAlloc::default(),
                    StandardAlloc::default(),
                ),
                total_out: 0,
                out: vec![0; OUT].into_boxed_slice(),
            })),
            [c] if c.eq_ignore_ascii_case("zstd") => {
                let Ok(mut decoder) = zstd::stream::raw::Decoder::new() else {
                    return Self::Unsupported;
                };
                if decoder
                    .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                    .is_err()
                {
                    return Self::Unsupported;
                }
                Kind::Zstd(Box::new(Zstd {
                    decoder,
                    out: vec![0; OUT].into_boxed_slice(),
                }))
            }
            _ => return Self::Unsupported,
        };
        Self::Decode(Box::new(Decoder {
            kind,
            stopped: false,
            encoded: 0,
            decoded: 0,
        }))
    }
}

impl Decoder {
    /// Decodes `input`, handing the output to `out` piece by piece (a few tens of KiB at
    /// most). After a decoding error, or past the decoded-size cap, the decoder stops: usage
    /// is then unknown.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) {
        if let Kind::Deflate(None, head) = &mut self.kind {
            // Two bytes tell zlib from raw deflate.
            let take = (2 - head.len()).min(input.len());
            head.extend_from_slice(&input[..take]);
            if head.len() < 2 {
                return;
            }
            let head = std::mem::take(head);
            let zlib =
                head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            let kind = if zlib {
                DeflateKind::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
            } else {
                DeflateKind::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
            };
            self.kind = Kind::Deflate(Some(kind), Vec::new());
            self.decode(&head, out);
            self.decode(&input[take..], out);
            return;
        }
        self.decode(input, out);
    }

    fn decode(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) {
        if self.stopped || input.is_empty() {
            return;
        }
        self.encoded += input.len() as u64;
        let allowed = FREE_DECODED.saturating_add(self.encoded.saturating_mul(MAX_RATIO));
        let decoded = &mut self.decoded;
        // Each piece is counted, and refused once the total would pass the cap.
        let out = &mut |piece: &[u8]| {
            *decoded += piece.len() as u64;
            if *decoded > allowed {
                tracing::warn!(
                    decoded = *decoded,
                    "compressed response decodes past its size cap: metering stops"
                );
                return false;
            }
            out(piece);
            true
        };
        let go_on = match &mut self.kind {
            Kind::Gzip(d) => flate(d, input, out),
            Kind::Deflate(Some(DeflateKind::Zlib(d)), _) => flate(d, input, out),
            Kind::Deflate(Some(DeflateKind::Raw(d)), _) => flate(d, input, out),
            Kind::Deflate(None, _) => true,
            Kind::Brotli(b) => brotli(b, input, out),
            Kind::Zstd(z) => zstd(z, input, out),
        };
        self.stopped = !go_on;
    }
}

/// A flate2 writer decoding into a `Vec`.
trait Flate: Write {
    fn output(&mut self) -> &mut Vec<u8>;
}

impl Flate for flate2::write::MultiGzDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
}

impl Flate for flate2::write::ZlibDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
}

impl Flate for flate2::write::DeflateDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
}

/// Decodes `input` with a flate2 writer. `write` (not `write_all`, which would decode all of
/// `input` into the `Vec` first) consumes only as much input as fills the writer's 32 KiB
/// buffer, and passes the previous buffer on to the `Vec`; that is handed on before the next
/// call, and `flush` hands on the rest. Returns false after an error.
fn flate(d: &mut impl Flate, mut input: &[u8], out: &mut dyn FnMut(&[u8]) -> bool) -> bool {
    let mut drain = |d: &mut dyn Flate| {
        let buf = d.output();
        let taken = buf.is_empty() || out(buf);
        buf.clear();
        taken
    };
    while !input.is_empty() {
        let written = d.write(input);
        if !drain(d) {
            return false;
        }
        match written {
            Ok(n) if n > 0 => input = &input[n..],
            _ => return false,
        }
    }
    let flushed = d.flush().is_ok();
    drain(d) && flushed
}

/// Returns false after an error or at the end of the stream (anything after it is ignored).
fn brotli(b: &mut Brotli, input: &[u8], out: &mut dyn FnMut(&[u8]) -> bool) -> bool {
    let Brotli {
        state,
        total_out,
        out: buf,
    } = b;
    let mut available_in = input.len();
    let mut input_offset = 0;
    loop {
        let mut available_out = buf.len();
        let mut output_offset = 0;
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            buf,
            total_out,
            state,
        );
        if output_offset > 0 && !out(&buf[..output_offset]) {
            return false;
        }
        match result {
            BrotliResult::NeedsMoreOutput => {}
            BrotliResult::NeedsMoreInput => return true,
            BrotliResult::ResultSuccess | BrotliResult::ResultFailure => return false,
        }
    }
}

/// Concatenated frames are decoded one after the other. Returns false after an error.
fn zstd(z: &mut Zstd, input: &[u8], out: &mut dyn FnMut(&[u8]) -> bool) -> bool {
    let mut input = InBuffer::around(input);
    loop {
        let mut output = OutBuffer::around(&mut z.out[..]);
        let result = z.decoder.run(&mut input, &mut output);
        let written = output.pos();
        if written > 0 && !out(&z.out[..written]) {
            return false;
        }
        if result.is_err() {
            return false;
        }
        // Output left unfilled: all that this input gives is out.
        if input.pos() == input.src.len() && written < z.out.len() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn decode_all(encoding: &str, data: &[u8], chunk: usize) -> Vec<u8> {
        let Encoding::Decode(mut d) = Encoding::from_header(Some(encoding.as_bytes())) else {
            panic!("{encoding} not decodable");
        };
        let mut out = Vec::new();
        for c in data.chunks(chunk) {
            d.feed(c, &mut |b| out.extend_from_slice(b));
        }
        out
    }

    /// `n` small SSE events.
    fn events(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("data: {{\"n\":{i}}}\n\n").into_bytes())
            .collect()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn every_encoding_round_trips_in_any_chunking() {
        let text = events(20_000);
        let gz = gzip(&text);
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&text).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&text).unwrap();
        let raw = raw.finish().unwrap();
        let zs = zstd::stream::encode_all(&text[..], 3).unwrap();
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &text[..], &mut br, &Default::default()).unwrap();
        let cases = [
            ("gzip", &gz),
            ("deflate", &zl),
            ("deflate", &raw),
            ("zstd", &zs),
            ("br", &br),
        ];
        for (enc, data) in cases {
            for chunk in [1, 7, 4096, 100_000] {
                let got = decode_all(enc, data, chunk);
                assert!(
                    got == text,
                    "{enc} in {chunk}-byte chunks: {} of {} bytes",
                    got.len(),
                    text.len()
                );
            }
        }
    }

    /// Decodes `data` in 64 KiB chunks: the number of bytes decoded and the largest piece.
    fn decode_sizes(encoding: &str, data: &[u8]) -> (usize, usize) {
        let Encoding::Decode(mut d) = Encoding::from_header(Some(encoding.as_bytes())) else {
            panic!("{encoding} not decodable");
        };
        let (mut total, mut largest) = (0, 0);
        for c in data.chunks(1 << 16) {
            d.feed(c, &mut |b| {
                total += b.len();
                largest = largest.max(b.len());
            });
        }
        (total, largest)
    }

    #[test]
    fn a_bomb_is_handed_on_in_small_pieces() {
        const DECODED: usize = 16 << 20;
        let zeros = vec![0u8; DECODED];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&zeros).unwrap();
        let gz = gz.finish().unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&zeros).unwrap();
        let raw = raw.finish().unwrap();
        let zs = zstd::stream::encode_all(&zeros[..], 1).unwrap();
        let mut br = Vec::new();
        {
            let mut e = brotli::CompressorWriter::new(&mut br, 1 << 16, 1, 22);
            e.write_all(&zeros).unwrap();
        }
        for (enc, data) in [("gzip", &gz), ("deflate", &raw), ("zstd", &zs), ("br", &br)] {
            let (total, largest) = decode_sizes(enc, data);
            assert_eq!(total, DECODED, "{enc}");
            // flate2 may hand over what it holds and a new piece together.
            assert!(largest <= 2 * OUT, "{enc}: a piece of {largest} bytes");
        }
    }

    #[test]
    fn decoding_stops_past_the_size_cap() {
        // 1 GiB of zeros in a few KiB of zstd, made without holding the zeros.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let mib = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            e.write_all(&mib).unwrap();
        }
        let bomb = e.finish().unwrap();
        let Encoding::Decode(mut d) = Encoding::from_header(Some(b"zstd")) else {
            panic!("zstd not decodable");
        };
        let mut total = 0u64;
        for c in bomb.chunks(4096) {
            d.feed(c, &mut |b| total += b.len() as u64);
        }
        let cap = FREE_DECODED + MAX_RATIO * bomb.len() as u64;
        assert!(
            cap < 1 << 30,
            "the bomb is over the cap: {} bytes",
            bomb.len()
        );
        assert!(
            (FREE_DECODED..=cap).contains(&total),
            "{total} decoded, cap {cap}"
        );
        d.feed(&bomb, &mut |_| panic!("decoding went on past the cap"));
    }

    #[test]
    fn zstd_windows_over_8_mib_are_refused() {
        let text = b"data: {}\n\n".repeat(100_000);
        for (window_log, decodes) in [(23, true), (24, false)] {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.set_parameter(zstd::stream::raw::CParameter::WindowLog(window_log))
                .unwrap();
            e.write_all(&text).unwrap();
            let zs = e.finish().unwrap();
            assert_eq!(zstd::stream::decode_all(&zs[..]).unwrap(), text);
            let (total, _) = decode_sizes("zstd", &zs);
            assert_eq!(
                total == text.len(),
                decodes,
                "window log {window_log}: {total}"
            );
            if !decodes {
                assert_eq!(total, 0);
            }
        }
    }

    #[test]
    fn brotli_large_windows_are_refused() {
        let text = b"data: {}\n\n".repeat(100_000);
        for (lgwin, large_window, decodes) in [(24, false, true), (26, true, false)] {
            let params = brotli::enc::BrotliEncoderParams {
                quality: 5,
                lgwin,
                large_window,
                ..Default::default()
            };
            let mut br = Vec::new();
            brotli::BrotliCompress(&mut &text[..], &mut br, &params).unwrap();
            // The library's own decoder accepts large windows.
            let mut plain = Vec::new();
            brotli_decompressor::BrotliDecompress(&mut &br[..], &mut plain).unwrap();
            assert_eq!(plain, text);
            let (total, _) = decode_sizes("br", &br);
            assert_eq!(total == text.len(), decodes, "lgwin {lgwin}: {total}");
            if !decodes {
                assert_eq!(total, 0);
            }
        }
    }

    #[test]
    fn concatenated_gzip_members_and_zstd_frames_are_all_decoded() {
        let text = events(5_000);
        let gz = gzip(&text).repeat(3);
        let zs = zstd::stream::encode_all(&text[..], 3).unwrap().repeat(3);
        for (enc, data) in [("gzip", &gz), ("zstd", &zs)] {
            for chunk in [1, 4096, 1 << 20] {
                assert!(
                    decode_all(enc, data, chunk) == text.repeat(3),
                    "{enc} {chunk}"
                );
            }
        }
    }

    #[test]
    fn garbage_stops_decoding_without_panic() {
        for enc in ["gzip", "deflate", "br", "zstd"] {
            let out = decode_all(enc, &[0xde, 0xad, 0xbe, 0xef].repeat(1000), 13);
            assert!(out.len() < 16_000, "{enc}");
        }
    }

    #[test]
    fn unsupported_and_identity() {
        assert!(matches!(Encoding::from_header(None), Encoding::Identity));
        assert!(matches!(
            Encoding::from_header(Some(b"identity")),
            Encoding::Identity
        ));
        assert!(matches!(
            Encoding::from_header(Some(b"gzip, br")),
            Encoding::Unsupported
        ));
        assert!(matches!(
            Encoding::from_header(Some(b"compress")),
            Encoding::Unsupported
        ));
        assert!(matches!(
            Encoding::from_header(Some(b"GZIP")),
            Encoding::Decode(_)
        ));
    }
}
