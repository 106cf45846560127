//! A side copy of a compressed response body, decoded for metering only: the client still
//! receives the encoded bytes. (Higress skips compressed bodies and never charges them.)

use std::io::Write;

/// Input is fed to a decoder in slices of this size and the output drained after each, so a
/// highly compressible body (a "zip bomb") never makes more than a few MiB of output at once.
const SLICE: usize = 4096;

/// A streaming decoder for one `Content-Encoding`.
pub(crate) struct Decoder {
    kind: Kind,
    failed: bool,
}

enum Kind {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    /// HTTP `deflate` is the zlib format; some servers send raw deflate, recognised by its
    /// first bytes not being a zlib header.
    Deflate(Option<DeflateKind>, Vec<u8>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

enum DeflateKind {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
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
            [c] if c.eq_ignore_ascii_case("br") => Kind::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Vec::new(), SLICE),
            )),
            [c] if c.eq_ignore_ascii_case("zstd") => {
                match zstd::stream::write::Decoder::new(Vec::new()) {
                    Ok(d) => Kind::Zstd(d),
                    Err(_) => return Self::Unsupported,
                }
            }
            _ => return Self::Unsupported,
        };
        Self::Decode(Box::new(Decoder {
            kind,
            failed: false,
        }))
    }
}

impl Decoder {
    /// Decodes `input`, handing the output to `out` piece by piece. After a decoding error the
    /// decoder stops: usage is then unknown.
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
            self.feed_slices(&head, out);
            self.feed_slices(&input[take..], out);
            return;
        }
        self.feed_slices(input, out);
    }

    fn feed_slices(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) {
        for slice in input.chunks(SLICE) {
            if self.failed {
                return;
            }
            let written = match &mut self.kind {
                Kind::Gzip(d) => d.write_all(slice).and_then(|()| d.flush()),
                Kind::Deflate(Some(DeflateKind::Zlib(d)), _) => {
                    d.write_all(slice).and_then(|()| d.flush())
                }
                Kind::Deflate(Some(DeflateKind::Raw(d)), _) => {
                    d.write_all(slice).and_then(|()| d.flush())
                }
                Kind::Deflate(None, _) => Ok(()),
                Kind::Brotli(d) => d.write_all(slice).and_then(|()| d.flush()),
                Kind::Zstd(d) => d.write_all(slice).and_then(|()| d.flush()),
            };
            if written.is_err() {
                self.failed = true;
            }
            self.drain(out);
        }
    }

    fn drain(&mut self, out: &mut dyn FnMut(&[u8])) {
        let buf = match &mut self.kind {
            Kind::Gzip(d) => d.get_mut(),
            Kind::Deflate(Some(DeflateKind::Zlib(d)), _) => d.get_mut(),
            Kind::Deflate(Some(DeflateKind::Raw(d)), _) => d.get_mut(),
            Kind::Deflate(None, _) => return,
            Kind::Brotli(d) => d.get_mut(),
            Kind::Zstd(d) => d.get_mut(),
        };
        if !buf.is_empty() {
            out(buf);
            buf.clear();
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

    #[test]
    fn every_encoding_round_trips_in_any_chunking() {
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("data: {{\"n\":{i}}}\n\n").into_bytes())
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
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
