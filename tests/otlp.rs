//! Traces over OTLP: a fake collector on 127.0.0.1:0 receives the server's spans, named
//! after the stages, parented under `rpc`, which takes the client's `traceparent` as its
//! parent. (One test in this binary: it installs the global subscriber.)

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{chunks, f32_bytes, header, models, unary, TestServer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};
use voxconv::config::{Config, LogFormat};
use voxconv::proto::voxconv::v1 as pb;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TRACE_A: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_A: &str = "b7ad6b7169203331";
const TRACE_B: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_B: &str = "00f067aa0ba902b7";

/// The spans of one trace, checked: one `rpc` whose parent is the client's span, every other
/// span below it. Returns the names of the spans under `rpc`.
fn check_trace(spans: &[Span], trace: &str, client_span: &str) -> Vec<String> {
    let mine: Vec<&Span> = spans.iter().filter(|s| hex(&s.trace_id) == trace).collect();
    let rpc: Vec<&&Span> = mine.iter().filter(|s| s.name == "rpc").collect();
    assert_eq!(rpc.len(), 1, "one rpc span in trace {trace}");
    let rpc = rpc[0];
    assert_eq!(
        hex(&rpc.parent_span_id),
        client_span,
        "rpc's parent is the caller's span"
    );
    let by_id: HashMap<String, &Span> = mine.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let rpc_id = hex(&rpc.span_id);
    let mut names = Vec::new();
    for s in &mine {
        if s.name == "rpc" {
            continue;
        }
        // Walk up to rpc.
        let mut at = *s;
        let mut depth = 0;
        while hex(&at.parent_span_id) != rpc_id {
            at = by_id
                .get(&hex(&at.parent_span_id))
                .unwrap_or_else(|| panic!("span {} is not under rpc", s.name));
            depth += 1;
            assert!(depth < 10);
        }
        names.push(s.name.clone());
    }
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_under_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry = Arc::new(
        voxconv::obs::telemetry::init("warn", LogFormat::Text, Some(&format!("http://{addr}")))
            .unwrap(),
    );

    let srv = TestServer::start(Config::for_tests(), models()).await;
    let mut client = srv.client().await;
    let shape = [1u64, 1, 6, 5, 4];
    let x = f32_bytes(&voxconv::kernel::seeded(120, 1));
    let mut req = Request::new(unary("sobel3d", pb::DType::Fp32, &shape, x.clone()));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_A}-{PARENT_A}-01").parse().unwrap(),
    );
    client.infer(req).await.unwrap();

    let msgs: Vec<_> = std::iter::once(header("sobel3d", &shape, pb::DType::Fp32, 0))
        .chain(chunks(&x, 100))
        .collect();
    let mut req = Request::new(tokio_stream::iter(msgs));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_B}-{PARENT_B}-01").parse().unwrap(),
    );
    let mut s = client.infer_stream(req).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}

    // Flush until both rpc spans arrived (the stream's span ends after its last message).
    let t0 = Instant::now();
    loop {
        let t = Arc::clone(&telemetry);
        tokio::task::spawn_blocking(move || t.flush())
            .await
            .unwrap();
        let got = collector.spans.lock().unwrap().clone();
        let rpcs = got
            .iter()
            .filter(|s| s.name == "rpc")
            .filter(|s| [TRACE_A, TRACE_B].contains(&hex(&s.trace_id).as_str()))
            .count();
        if rpcs == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "spans: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spans = collector.spans.lock().unwrap().clone();
    let unary = check_trace(&spans, TRACE_A, PARENT_A);
    for stage in ["validate", "queue_wait", "compute", "decode", "encode"] {
        assert!(
            unary.iter().any(|n| n == stage),
            "Infer lacks {stage}: {unary:?}"
        );
    }
    let stream = check_trace(&spans, TRACE_B, PARENT_B);
    for stage in ["validate", "queue_wait", "decode", "compute", "send"] {
        assert!(
            stream.iter().any(|n| n == stage),
            "InferStream lacks {stage}: {stream:?}"
        );
    }
    eprintln!("Infer spans under rpc: {unary:?}\nInferStream spans under rpc: {stream:?}");
}
