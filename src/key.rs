//! Where a limit key's value comes from: a header, a query parameter, a cookie, the
//! authenticated consumer, the client IP, or your own [`KeyExtractor`].

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{COOKIE, HeaderMap, HeaderName};
use http::{Extensions, Method, Uri};
use ipnet::IpNet;

/// The authenticated caller, placed in the request extensions by an auth layer that runs before
/// this one. `limit_by_consumer` / `limit_by_per_consumer` rules key on it.
///
/// ```
/// use tower_token_ratelimit::Consumer;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Consumer::new("alice"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Consumer(Arc<str>);

impl Consumer {
    /// A consumer with this name.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The consumer's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's address, for servers that are neither axum (`ConnectInfo`) nor tonic: insert it
/// into the request extensions and `from-remote-addr` rules use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// A read-only view of the request, given to a [`KeyExtractor`].
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    pub(crate) fn new<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    pub(crate) fn from_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions (e.g. what an auth layer put there).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

/// Computes a key value from a request, for [`Rule::per_key`](crate::Rule::per_key).
///
/// Implemented for closures `Fn(&RequestView<'_>) -> Option<String>`. Returning `None` means
/// the rule does not apply to this request.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key value for this request, if any.
    fn extract(&self, request: &RequestView<'_>) -> Option<String>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&RequestView<'_>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, request: &RequestView<'_>) -> Option<String> {
        self(request)
    }
}

/// Where the value of a rule item comes from.
#[derive(Clone)]
pub(crate) enum KeySource {
    Header(HeaderName),
    Param(String),
    Cookie(String),
    Consumer,
    Ip(IpSource),
    /// The model the request names (JSON `model`, or Gemini's path).
    Model,
    /// Several sources joined with `|`, e.g. consumer × model; absent when any part is.
    Composite(Vec<KeySource>),
    Custom(Arc<dyn KeyExtractor>),
}

/// Where the client IP comes from (`limit_by_per_ip`).
#[derive(Debug, Clone)]
pub(crate) enum IpSource {
    /// `from-remote-addr`: the TCP peer.
    RemoteAddr,
    /// `from-header-<name>`: an `X-Forwarded-For`-style list (or `Forwarded`), right-most
    /// untrusted entry; the peer when the header gives no address.
    Header(HeaderName),
}

/// A value taken from a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyValue<'a> {
    /// Text to match keys against. `raw` holds the original bytes when they were not UTF-8
    /// (the text is then a lossy copy, and the counter key uses a hash of the raw bytes so two
    /// different values never share a counter). For a composite, `raw` is the parts' raw bytes
    /// with `\` and `|` escaped, joined with `|`, set when a part was not UTF-8 or held `\` or
    /// `|`.
    Text {
        text: Cow<'a, str>,
        raw: Option<Cow<'a, [u8]>>,
    },
    Ip(IpAddr),
}

/// What extraction needs besides the request.
pub(crate) struct ExtractContext<'c> {
    pub(crate) consumer_header: Option<&'c HeaderName>,
    pub(crate) trusted_proxies: &'c [IpNet],
    pub(crate) model: Option<&'c str>,
}

impl KeySource {
    /// Whether the value comes from the consumer, alone or as a composite's part.
    pub(crate) fn uses_consumer(&self) -> bool {
        match self {
            KeySource::Consumer => true,
            KeySource::Composite(parts) => parts.iter().any(KeySource::uses_consumer),
            _ => false,
        }
    }

    /// Whether the value needs the request body (the model).
    pub(crate) fn needs_model(&self) -> bool {
        match self {
            KeySource::Model => true,
            KeySource::Composite(parts) => parts.iter().any(KeySource::needs_model),
            _ => false,
        }
    }

    pub(crate) fn extract<'a>(
        &self,
        req: &RequestView<'a>,
        cx: &ExtractContext<'_>,
    ) -> Option<KeyValue<'a>> {
        match self {
            KeySource::Header(name) => header_value(req.headers, name).or_else(|| {
                // HTTP/2 and 3 carry the host as `:authority`, which hyper puts in the URI: a
                // rule on `host` must not miss every h2 request.
                (name == http::header::HOST)
                    .then(|| req.uri.authority())
                    .flatten()
                    .map(|a| text(Cow::Borrowed(a.as_str())))
            }),
            KeySource::Param(name) => param_value(req.uri.query()?, name),
            KeySource::Cookie(name) => cookie_value(req.headers, name),
            KeySource::Consumer => {
                if let Some(c) = req.extensions.get::<Consumer>() {
                    return Some(text(Cow::Owned(c.as_str().to_owned())));
                }
                header_value(req.headers, cx.consumer_header?)
            }
            KeySource::Ip(source) => client_ip(req, source, cx.trusted_proxies).map(KeyValue::Ip),
            KeySource::Model => cx.model.map(|m| text(Cow::Owned(m.to_owned()))),
            KeySource::Composite(parts) => {
                // The text joins the parts as they are, for matching; the counter key is read
                // from the parts' bytes with `\` and `|` escaped by `\`, joined with `|`,
                // whenever a part is not UTF-8 or holds one of those, so that two different
                // lists of parts (`a|b`, `c` and `a`, `b|c`) never share a counter.
                let mut joined = String::new();
                // Made when a part first needs it: until then it would equal `joined`.
                let mut encoded: Option<Vec<u8>> = None;
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        joined.push('|');
                        if let Some(e) = &mut encoded {
                            e.push(b'|');
                        }
                    }
                    let start = joined.len();
                    let part_raw = match part.extract(req, cx)? {
                        KeyValue::Text { text, raw } => {
                            joined.push_str(&text);
                            raw
                        }
                        KeyValue::Ip(ip) => {
                            joined.push_str(&ip.to_string());
                            None
                        }
                    };
                    let bytes = part_raw.as_deref().unwrap_or(&joined.as_bytes()[start..]);
                    let escaped = |b: &u8| matches!(b, b'|' | b'\\');
                    if encoded.is_none() && (part_raw.is_some() || bytes.iter().any(escaped)) {
                        encoded = Some(joined.as_bytes()[..start].to_vec());
                    }
                    if let Some(e) = &mut encoded {
                        for b in bytes {
                            if escaped(b) {
                                e.push(b'\\');
                            }
                            e.push(*b);
                        }
                    }
                }
                Some(KeyValue::Text {
                    text: Cow::Owned(joined),
                    raw: encoded.map(Cow::Owned),
                })
            }
            KeySource::Custom(extractor) => extractor.extract(req).map(|v| text(Cow::Owned(v))),
        }
        .filter(|v| !matches!(v, KeyValue::Text { text, .. } if text.is_empty()))
    }
}

fn text(text: Cow<'_, str>) -> KeyValue<'_> {
    KeyValue::Text { text, raw: None }
}

fn header_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<KeyValue<'a>> {
    // Not `HeaderValue::to_str`, which refuses every byte over 0x7f: `josé` is text.
    Some(bytes_value(Cow::Borrowed(headers.get(name)?.as_bytes())))
}

/// Bytes as a value: text when they are UTF-8, else raw (their text a lossy copy).
fn bytes_value(bytes: Cow<'_, [u8]>) -> KeyValue<'_> {
    match bytes {
        Cow::Borrowed(b) => match std::str::from_utf8(b) {
            Ok(s) => text(Cow::Borrowed(s)),
            Err(_) => KeyValue::Text {
                text: String::from_utf8_lossy(b),
                raw: Some(Cow::Borrowed(b)),
            },
        },
        Cow::Owned(b) => match String::from_utf8(b) {
            Ok(s) => text(Cow::Owned(s)),
            Err(e) => KeyValue::Text {
                text: Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
                raw: Some(Cow::Owned(e.into_bytes())),
            },
        },
    }
}

/// The first value of query parameter `name`, decoded as a form does (`+` is a space, `%XX`
/// a byte). Decoded bytes that are not UTF-8 stay raw, so `%FF` and `%FE` never share a
/// counter (a lossy decoding would read both as U+FFFD).
fn param_value<'a>(query: &'a str, name: &str) -> Option<KeyValue<'a>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (*form_decode(key) == *name.as_bytes()).then(|| bytes_value(form_decode(value)))
    })
}

fn form_decode(s: &str) -> Cow<'_, [u8]> {
    if !s.contains('+') {
        return percent_encoding::percent_decode_str(s).into();
    }
    let spaced = s.replace('+', " ");
    Cow::Owned(percent_encoding::percent_decode_str(&spaced).collect())
}

/// The first cookie `name` of the `Cookie` headers. Each `;`-separated pair is parsed on its
/// own, so that a pair that is not UTF-8 hides no other; a value that is not UTF-8 stays raw.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<KeyValue<'a>> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| match std::str::from_utf8(pair) {
            Ok(pair) => cookie::Cookie::parse(pair)
                .ok()
                .filter(|c| c.name() == name)
                .map(|c| text(Cow::Owned(c.value().to_owned()))),
            Err(_) => {
                let at = pair.iter().position(|&b| b == b'=')?;
                (pair[..at].trim_ascii() == name.as_bytes())
                    .then(|| bytes_value(Cow::Borrowed(pair[at + 1..].trim_ascii())))
            }
        })
}

/// The TCP peer's address, from axum's `ConnectInfo<SocketAddr>` (also set by
/// `MockConnectInfo`), tonic's `TcpConnectInfo`, a [`ClientAddr`], or a plain `SocketAddr`
/// extension.
pub(crate) fn peer_ip(extensions: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip().to_canonical());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::connect_info::MockConnectInfo(addr)) =
        extensions.get::<axum::extract::connect_info::MockConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip().to_canonical());
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
    {
        return Some(addr.ip().to_canonical());
    }
    if let Some(ClientAddr(ip)) = extensions.get::<ClientAddr>() {
        return Some(ip.to_canonical());
    }
    extensions
        .get::<SocketAddr>()
        .map(|a| a.ip().to_canonical())
}

fn client_ip(req: &RequestView<'_>, source: &IpSource, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer_ip(req.extensions);
    match source {
        IpSource::RemoteAddr => peer,
        // With trusted proxies configured, the peer is the right-most hop: a client that
        // connects directly (not through a trusted proxy) is keyed by its own address, whatever
        // header it sends.
        IpSource::Header(_)
            if !trusted.is_empty() && peer.is_some_and(|p| !is_trusted(p, trusted)) =>
        {
            peer
        }
        IpSource::Header(name) => forwarded_ip(req.headers, name, trusted).or(peer),
    }
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The right-most address of a forwarding list that is not a trusted proxy. Entries are read
/// from the right and reading stops at the first untrusted one, so a client cannot choose its
/// key by prepending entries, and a huge header costs no more than its trusted suffix.
fn forwarded_ip(headers: &HeaderMap, name: &HeaderName, trusted: &[IpNet]) -> Option<IpAddr> {
    let is_forwarded = name == http::header::FORWARDED;
    let mut last_trusted = None;
    for value in headers.get_all(name).iter().rev() {
        // Entry by entry: a byte that is not text in an entry a client wrote further left
        // must not hide the address a trusted proxy appended.
        for entry in value.as_bytes().rsplit(|&b| b == b',') {
            let entry = std::str::from_utf8(entry).ok();
            let entry = if is_forwarded {
                entry.and_then(forwarded_for)
            } else {
                entry
            };
            let Some(ip) = entry.and_then(parse_ip_entry) else {
                // An unparsable entry where the client address should be: nothing usable.
                return last_trusted;
            };
            if is_trusted(ip, trusted) {
                last_trusted = Some(ip);
                continue;
            }
            return Some(ip);
        }
    }
    last_trusted
}

/// The `for=` parameter of one `Forwarded` element (RFC 7239).
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`, `"[::1]:80"`, `::ffff:1.2.3.4`.
pub(crate) fn parse_ip_entry(entry: &str) -> Option<IpAddr> {
    let s = entry.trim().trim_matches('"');
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(sa) = s.parse::<SocketAddr>() {
        sa.ip()
    } else {
        s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str], trusted: &[&str]) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        let trusted: Vec<IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        forwarded_ip(
            &headers,
            &HeaderName::from_static("x-forwarded-for"),
            &trusted,
        )
    }

    #[test]
    fn right_most_untrusted_wins() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            xff(&["6.6.6.6, 1.2.3.4, 10.0.0.2"], &["10.0.0.0/8"]),
            ip("1.2.3.4")
        );
        assert_eq!(xff(&["6.6.6.6", "1.2.3.4"], &[]), ip("1.2.3.4"));
        assert_eq!(
            xff(&["10.0.0.1, 10.0.0.2"], &["10.0.0.0/8"]),
            ip("10.0.0.1")
        );
        assert_eq!(xff(&["[2001:db8::1]:443"], &[]), ip("2001:db8::1"));
        assert_eq!(xff(&["::ffff:1.2.3.4"], &[]), ip("1.2.3.4"));
        assert_eq!(xff(&["1.2.3.4:5678"], &[]), ip("1.2.3.4"));
        assert_eq!(xff(&["garbage, 10.0.0.2"], &["10.0.0.0/8"]), ip("10.0.0.2"));
        assert_eq!(xff(&["garbage"], &[]), None);
    }

    /// A byte that is not text in an entry the client wrote does not hide the address the
    /// trusted proxy appended (the whole value was dropped, and the proxy's own address used).
    #[test]
    fn bytes_that_are_not_text_spoil_only_their_own_entry() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        for (name, value, want) in [
            ("x-forwarded-for", &b"\x80, 203.0.113.9"[..], "203.0.113.9"),
            (
                "x-forwarded-for",
                &b"caf\xc3\xa9, 203.0.113.9, 10.0.0.2"[..],
                "203.0.113.9",
            ),
            (
                "forwarded",
                &b"for=\x80, for=203.0.113.9"[..],
                "203.0.113.9",
            ),
        ] {
            let mut headers = HeaderMap::new();
            let name = HeaderName::from_static(name);
            headers.insert(&name, http::HeaderValue::from_bytes(value).unwrap());
            assert_eq!(
                forwarded_ip(&headers, &name, &trusted),
                Some(want.parse().unwrap()),
                "{value:?}"
            );
        }
        // Where the client address should be, such an entry is still nothing usable.
        let mut headers = HeaderMap::new();
        let name = HeaderName::from_static("x-forwarded-for");
        headers.insert(
            &name,
            http::HeaderValue::from_bytes(b"1.2.3.4, \x80").unwrap(),
        );
        assert_eq!(forwarded_ip(&headers, &name, &trusted), None);
    }

    #[test]
    fn forwarded_header() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::FORWARDED,
            "for=6.6.6.6, for=\"[2001:db8::7]:80\";proto=https"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded_ip(&headers, &http::header::FORWARDED, &[]),
            Some("2001:db8::7".parse().unwrap())
        );
    }
}
