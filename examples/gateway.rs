//! A reverse proxy for OpenAI-compatible LLM APIs, with token rate limits.
//!
//! ```text
//! cargo run --release --example gateway -- \
//!     --listen 127.0.0.1:8080 --upstream http://127.0.0.1:11434 --config examples/limits.yaml
//! ```
//!
//! Every request (any method, path and query) is forwarded to the upstream; request and
//! response bodies stream through unbuffered, so SSE tokens reach the client as they are made.
//! The limits come from a Higress `ai-token-ratelimit` YAML file (see `examples/limits.yaml`);
//! counters are kept in memory, or in Redis when the file has a `redis:` block. Requests over
//! a limit get a 429 without reaching the upstream; the usage the upstream reports is debited
//! when each response ends.
//!
//! `GET /healthz` answers `ok`; with the `metrics` feature, `GET /metrics` serves the metrics in
//! the Prometheus text format. Neither is rate limited.
//!
//! The upstream is plain `http://`, HTTP/1.1 or h2c (add a TLS connector for `https://`). Logs go
//! to stderr (`RUST_LOG`, default `info`); stdout gets one line, `listening on ADDR`. On ctrl-c
//! or SIGTERM the gateway stops accepting, lets requests in flight finish, writes their debits
//! and exits 0. On SIGHUP it reads the config file again and applies its limits without
//! resetting counters. Bad arguments exit 2, a bad config file exits 1 with every problem
//! listed.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_token_ratelimit::{RedisConfig, TokenRateLimitConfig, TokenRateLimitLayer};
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
usage: gateway --listen ADDR --upstream URL --config FILE [--redis URL]

  --listen ADDR    address to serve on, e.g. 127.0.0.1:8080 (port 0: any free port)
  --upstream URL   the OpenAI-compatible API to forward to: http://HOST:PORT[/BASE-PATH]
  --config FILE    token limits in the Higress ai-token-ratelimit YAML (examples/limits.yaml)
  --redis URL      keep counters in this Redis (redis://[user[:password]@]host[:port][/db]),
                   instead of the config's redis: block or memory
  --h2c            speak HTTP/2 without TLS to the upstream (default HTTP/1.1)
  --timeout SECS   longest wait for the upstream's response head (default 300); then 504
  --head-timeout SECS
                   longest wait for a client's request head (default 30); then the
                   connection is closed, at shutdown too
  --log LEVEL      error, warn, info (default), debug or trace; RUST_LOG overrides it
  --help           print this help

RUST_LOG sets the log level (default info).";

/// Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

struct Args {
    listen: SocketAddr,
    upstream: Upstream,
    config: String,
    redis: Option<String>,
    log: String,
    head_timeout: Duration,
}

/// `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let (mut listen, mut upstream, mut config, mut redis) = (None, None, None, None);
    let (mut log, mut timeout, mut head_timeout, mut h2c) = (None, None, None, false);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--listen" => &mut listen,
            "--upstream" => &mut upstream,
            "--config" => &mut config,
            "--redis" => &mut redis,
            "--log" => &mut log,
            "--timeout" => &mut timeout,
            "--head-timeout" => &mut head_timeout,
            "--h2c" => {
                h2c = true;
                continue;
            }
            "--help" | "-h" => return Ok(None),
            _ => return Err(format!("unknown argument `{flag}`")),
        };
        *slot = Some(args.next().ok_or(format!("{flag} needs a value"))?);
    }
    let (Some(listen), Some(upstream), Some(config)) = (listen, upstream, config) else {
        return Err("--listen, --upstream and --config are required".into());
    };
    let listen = listen
        .parse()
        .map_err(|e| format!("--listen `{listen}`: {e} (expected e.g. 127.0.0.1:8080)"))?;
    let seconds = |flag: &str, value: Option<String>, default: u64| match value {
        None => Ok(Duration::from_secs(default)),
        Some(t) => t
            .parse()
            .ok()
            .filter(|&s: &u64| s > 0)
            .map(Duration::from_secs)
            .ok_or(format!("{flag} `{t}`: expected whole seconds > 0")),
    };
    let timeout = seconds("--timeout", timeout, 300)?;
    let head_timeout = seconds("--head-timeout", head_timeout, 30)?;
    let log = log.unwrap_or_else(|| "info".into());
    if !["error", "warn", "info", "debug", "trace"].contains(&log.as_str()) {
        return Err(format!(
            "--log `{log}`: expected error, warn, info, debug or trace"
        ));
    }
    let upstream = Upstream::new(&upstream, h2c, timeout).ok_or(format!(
        "--upstream `{upstream}`: expected http://HOST:PORT[/PATH]"
    ))?;
    Ok(Some(Args {
        listen,
        upstream,
        config,
        redis,
        log,
        head_timeout,
    }))
}

fn read_config(path: &Path) -> Result<TokenRateLimitConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    serde_yaml::from_str(&text).map_err(|e| e.to_string())
}

fn load_limits(path: &Path, redis: Option<&str>) -> Result<TokenRateLimitLayer, String> {
    let mut config = read_config(path)?;
    if let Some(url) = redis {
        let mut block = RedisConfig::default();
        block.url = Some(url.to_owned());
        config.redis = Some(block);
    }
    TokenRateLimitLayer::from_config(config).map_err(|e| e.to_string())
}

/// Where requests go, and one pooled client to send them.
#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Body>,
    /// HTTP/2 without TLS (h2c) rather than HTTP/1.1.
    h2c: bool,
    /// Longest wait for the response head.
    timeout: Duration,
    /// `http://host:port` plus the base path, without a trailing `/`.
    base: Arc<str>,
    host: HeaderValue,
}

impl Upstream {
    /// `None` unless `url` is `http://HOST[:PORT][/PATH]` (this example has no TLS; no
    /// credentials, which would go out as the `Host` header).
    fn new(url: &str, h2c: bool, timeout: Duration) -> Option<Self> {
        let uri: Uri = url.parse().ok()?;
        let (Some("http"), Some(authority), None) =
            (uri.scheme_str(), uri.authority(), uri.query())
        else {
            return None;
        };
        if authority.as_str().contains('@') {
            return None;
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true); // small SSE chunks must not wait for Nagle
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        Some(Self {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http2_only(h2c)
                .build(connector),
            h2c,
            timeout,
            base: format!("http://{authority}{}", uri.path().trim_end_matches('/')).into(),
            host: HeaderValue::from_str(authority.as_str()).ok()?,
        })
    }
}

/// Forwards any request to the upstream and streams the answer back.
async fn forward(
    State(upstream): State<Upstream>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    // Only origin-form targets name a path to forward (`OPTIONS *` does not).
    let uri = format!("{}{path}", upstream.base).parse::<Uri>();
    let (true, Ok(uri)) = (path.starts_with('/'), uri) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid request path",
            "invalid_request_error",
        );
    };
    // The path only: a query may carry a key (Gemini's `?key=`), and logs hold no secrets.
    tracing::debug!(method = %req.method(), path = %req.uri().path(), %peer, "forwarding");
    *req.uri_mut() = uri;
    // Whatever the client spoke, the upstream gets what it was configured for.
    *req.version_mut() = if upstream.h2c {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    headers.insert(header::HOST, upstream.host.clone());
    append_forwarded_for(headers, peer.ip());

    let Ok(sent) = tokio::time::timeout(upstream.timeout, upstream.client.request(req)).await
    else {
        tracing::warn!(timeout = ?upstream.timeout, "upstream sent no response head in time");
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream did not answer in time",
            "upstream_timeout",
        );
    };
    match sent {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            let cause = std::error::Error::source(&e).map_or(String::new(), |s| s.to_string());
            tracing::warn!(error = %e, %cause, "upstream request failed");
            let message = if e.is_connect() {
                "could not connect to the upstream"
            } else {
                "the upstream failed before sending a response"
            };
            error(StatusCode::BAD_GATEWAY, message, "upstream_error")
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Adds the peer to `X-Forwarded-For`, as one comma-separated value.
fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    let mut value = Vec::new();
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        value.extend_from_slice(prior.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.to_canonical().to_string().as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// An error in the OpenAI shape, so clients show it like any other API error.
fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": kind}});
    (status, Json(body)).into_response()
}

/// Resolves on ctrl-c or SIGTERM. The handlers are installed before the address is announced,
/// so a signal sent right after cannot kill the process before debits are flushed.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        );
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

/// On SIGHUP, reads the config file again and swaps in its limits; counters keep their used
/// tokens. A file with problems is logged and the running limits stay.
fn reload_on_sighup(path: &Path, limits: &TokenRateLimitLayer) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let (path, limits) = (path.to_owned(), limits.clone());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let reloaded = read_config(&path)
                    .and_then(|config| limits.reload(config).map_err(|e| e.to_string()));
                match reloaded {
                    Ok(()) => tracing::info!(config = %path.display(), "limits reloaded"),
                    Err(e) => tracing::error!(
                        config = %path.display(),
                        error = %e,
                        "reload failed; the running limits stay"
                    ),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (path, limits);
    Ok(())
}

/// `/metrics` in the Prometheus text format, with the `metrics` feature.
#[cfg(feature = "metrics")]
fn metrics_route() -> std::io::Result<Router> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(std::io::Error::other)?;
    Ok(Router::new().route("/metrics", get(move || std::future::ready(handle.render()))))
}

#[cfg(not(feature = "metrics"))]
fn metrics_route() -> std::io::Result<Router> {
    Ok(Router::new())
}

async fn serve(args: Args, limits: TokenRateLimitLayer) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    reload_on_sighup(Path::new(&args.config), &limits)?;
    tracing::info!(%addr, upstream = %args.upstream.base, "gateway started");
    let proxy = Router::new()
        .fallback(forward)
        .with_state(args.upstream)
        .layer(limits.clone());
    // Operational endpoints are not rate limited.
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(metrics_route()?)
        .merge(proxy);

    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;

    // hyper's own connections rather than `axum::serve`, for a timer: without one, hyper never
    // times out a request head, and a client that sends half of one holds its connection open
    // for ever (and, at shutdown, the process).
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(args.head_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), req)
        });
        let connection = builder
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    graceful.shutdown().await;
    limits.flush().await;
    tracing::info!("debits written; bye");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gateway: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| args.log.as_str().into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let limits = match load_limits(Path::new(&args.config), args.redis.as_deref()) {
        Ok(limits) => limits,
        Err(e) => {
            eprintln!("gateway: {}: {e}", args.config);
            return ExitCode::FAILURE;
        }
    };
    let listen = args.listen;
    match serve(args, limits).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: serving on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}
