//! TEMPORARY stub until the scanner lands (overwritten).
#![allow(missing_docs, dead_code)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub cache_creation_input_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}
impl Usage {
    pub fn total(&self) -> u64 {
        self.total_tokens.unwrap_or(0)
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Sse,
    Json,
}
impl BodyFormat {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        if ct.starts_with("text/event-stream") {
            Some(Self::Sse)
        } else if ct.contains("json") {
            Some(Self::Json)
        } else {
            None
        }
    }
}
#[derive(Debug)]
pub struct UsageScanner {
    buf: Vec<u8>,
    format: BodyFormat,
    usage: Option<Usage>,
}
impl UsageScanner {
    pub fn new(format: BodyFormat) -> Self {
        Self {
            buf: Vec::new(),
            format,
            usage: None,
        }
    }
    pub fn feed(&mut self, c: &[u8]) {
        self.buf.extend_from_slice(c)
    }
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
    pub fn finish(&mut self) -> Option<Usage> {
        let s = String::from_utf8_lossy(&self.buf);
        for part in s.split("\n\n") {
            let j = part.trim_start_matches("data: ");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(j) {
                if let Some(t) = v["usage"]["total_tokens"].as_u64() {
                    self.usage = Some(Usage {
                        total_tokens: Some(t),
                        ..Default::default()
                    })
                }
            }
        }
        self.usage
    }
}
