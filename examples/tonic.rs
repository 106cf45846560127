//! A gRPC service behind the token rate limit layer, and a tonic client that uses it until the
//! budget is spent and it gets `RESOURCE_EXHAUSTED`.
//!
//! ```sh
//! cargo run --example tonic --features tonic
//! ```
//!
//! The service (`demo.Llm/Generate`, written without code generation) reports the tokens each
//! call used in its response metadata (`x-usage-total-tokens`), which the layer reads with
//! [`HeaderUsage`]. The budget is per caller, from the `x-user` metadata.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_token_ratelimit::usage::HeaderUsage;
use tower_token_ratelimit::{Rule, TokenRateLimitLayer};

/// The request: a prompt.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GenerateRequest {
    /// What to answer.
    #[prost(string, tag = "1")]
    pub prompt: String,
}

/// The reply: some text.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GenerateReply {
    /// The answer.
    #[prost(string, tag = "1")]
    pub text: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The `demo.Llm` service, as tonic's code generator would write it.
#[derive(Clone, Default)]
struct LlmServer;

impl NamedService for LlmServer {
    const NAME: &'static str = "demo.Llm";
}

struct Generate;

impl UnaryService<GenerateRequest> for Generate {
    type Response = GenerateReply;
    type Future = BoxFuture<Result<Response<GenerateReply>, Status>>;

    fn call(&mut self, request: Request<GenerateRequest>) -> Self::Future {
        Box::pin(async move {
            let prompt = request.into_inner().prompt;
            let tokens = 20 + prompt.len() as u64 / 4;
            let mut reply = Response::new(GenerateReply {
                text: format!("an answer to {prompt:?}"),
            });
            reply
                .metadata_mut()
                .insert("x-usage-total-tokens", tokens.into());
            Ok(reply)
        })
    }
}

impl tower::Service<http::Request<Body>> for LlmServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() == "/demo.Llm/Generate" {
                let mut grpc = Grpc::new(ProstCodec::<GenerateReply, GenerateRequest>::default());
                return Ok(grpc.unary(Generate, request).await);
            }
            Ok(Status::unimplemented("no such method").into_http())
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let limits = TokenRateLimitLayer::builder()
        .usage_extractor(HeaderUsage::new())
        .rule(
            Rule::per_header("x-user")
                .any_value()
                .tokens_per_minute(100),
        )
        .build()?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        Server::builder()
            .layer(limits.clone())
            .add_service(LlmServer)
            .serve_with_incoming(incoming),
    );

    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = tonic::client::Grpc::new(channel);
    for n in 1..=10 {
        client.ready().await?;
        let mut request = Request::new(GenerateRequest {
            prompt: "How many tokens are left?".into(),
        });
        request
            .metadata_mut()
            .insert("x-user", "grpc-demo".parse()?);
        let path = PathAndQuery::from_static("/demo.Llm/Generate");
        let codec = ProstCodec::<GenerateRequest, GenerateReply>::default();
        match client.unary(request, path, codec).await {
            Ok(reply) => {
                let left = reply
                    .metadata()
                    .get("x-ratelimit-remaining-tokens")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                println!("call {n}: OK, {left} tokens were left before it");
                limits.flush().await; // debits are written in the background
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                println!("call {n}: {:?}: {}", status.code(), status.message());
                return Ok(());
            }
            Err(status) => return Err(status.into()),
        }
    }
    Err("the budget was never spent".into())
}
