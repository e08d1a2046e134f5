//! A minimal OTLP/gRPC trace collector for CI: prints one JSON line per received span
//! (`name`, `trace_id`, `span_id`, `parent_span_id`, hex) on stdout.
//!
//!     cargo run --release --example fake_otlp_collector -- 127.0.0.1:0 [PORT_FILE]
//!
//! With PORT_FILE, the bound address is written there (`listen=ADDR`) once listening.

use std::io::Write;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

struct Printer;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut out = std::io::stdout().lock();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let line = serde_json::json!({
                        "name": s.name,
                        "trace_id": hex(&s.trace_id),
                        "span_id": hex(&s.span_id),
                        "parent_span_id": hex(&s.parent_span_id),
                    });
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        let _ = out.flush();
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:4317".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    if let Some(path) = args.next() {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("listen={}\n", listener.local_addr()?))?;
        std::fs::rename(&tmp, &path)?;
    }
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Printer))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}
