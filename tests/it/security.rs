//! Security: TLS and mutual TLS, bearer tokens checked before the body is read, the audit
//! log, a canary value kept out of logs and the audit trail, a gzip bomb, and an overload
//! burst. Real servers on 127.0.0.1:0; each test prints the figures it measured.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{f32_bytes, models, unary, TestServer};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use voxconv::auth::{token_line, TokenSet};
use voxconv::config::{Config, TlsSettings};
use voxconv::proto::voxconv::v1 as pb;
use voxconv::proto::voxconv::v1::inference_client::InferenceClient;

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(names: &[&str], cn: &str, issuer: &CertifiedIssuer<'_, KeyPair>) -> (String, String) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca = make_ca("voxconv test CA");
    let rogue_ca = make_ca("someone else's CA");
    let (server_cert, server_key) = leaf(&["localhost"], "voxconv server", &ca);
    let (client_cert, client_key) = leaf(&[], "pipeline-a", &ca);
    let (rogue_cert, rogue_key) = leaf(&[], "intruder", &rogue_ca);
    Pki {
        ca_pem: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}

fn tiny_request() -> pb::InferRequest {
    unary(
        "sobel3d",
        pb::DType::Fp32,
        &[1, 1, 4, 4, 4],
        f32_bytes(&[0.5; 64]),
    )
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    ident: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((c, k)) = ident {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_of_our_ca() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = Config::for_tests();
    config.tls = Some(TlsSettings {
        cert: p.server_cert.clone().into_bytes(),
        key: p.server_key.clone().into_bytes(),
        client_ca: Some(p.ca_pem.clone().into_bytes()),
        handshake_timeout: Duration::from_secs(2),
    });
    config.audit_log = Some(audit.clone());
    let srv = TestServer::start(config, models()).await;

    // A client of our CA: served, and named by its certificate in the audit log.
    let ch = tls_channel(srv.addr, &p.ca_pem, Some((&p.client_cert, &p.client_key)))
        .await
        .unwrap();
    let r = InferenceClient::new(ch)
        .infer(tiny_request())
        .await
        .unwrap();
    assert_eq!(r.into_inner().output.unwrap().shape, vec![1, 3, 4, 4, 4]);

    // Plaintext to a TLS port: refused.
    let plain = async {
        let ch = Endpoint::from_shared(format!("http://{}", srv.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        InferenceClient::new(ch)
            .infer(tiny_request())
            .await
            .map_err(|e| e.into())
            .map(|_| ())
    };
    let plain: Result<(), Box<dyn std::error::Error>> = plain.await;
    assert!(plain.is_err(), "plaintext client was served");

    // A certificate from another CA, and no certificate at all: the handshake fails.
    for (what, ident) in [
        (
            "wrong CA",
            Some((p.rogue_cert.as_str(), p.rogue_key.as_str())),
        ),
        ("no client certificate", None),
    ] {
        let r = match tls_channel(srv.addr, &p.ca_pem, ident).await {
            Err(_) => Err("connect failed".to_string()),
            Ok(ch) => InferenceClient::new(ch)
                .infer(tiny_request())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        assert!(r.is_err(), "{what}: served");
        println!("mTLS: {what} refused ({})", r.unwrap_err());
    }
    let text = std::fs::read_to_string(&audit).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["caller"], "cert:pipeline-a");
    assert_eq!(line["method"], "Infer");
    assert_eq!(line["status"], "OK");
    println!("mTLS: our client served; audit line {line}");
}

/// Sends Infer with `token` and a body of `bytes`, returning the status code and time taken.
async fn call_with(
    client: &mut InferenceClient<Channel>,
    token: Option<&str>,
    bytes: usize,
) -> (tonic::Code, Duration) {
    let n = bytes / 4;
    let mut req = tonic::Request::new(unary(
        "sobel3d",
        pb::DType::Fp32,
        &[1, 1, 1, 1, n as u64],
        f32_bytes(&vec![0.25; n]),
    ));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let t0 = Instant::now();
    let code = match client.infer(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    (code, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_the_body_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = Config::for_tests();
    config.max_message_bytes = 80 << 20;
    config.auth_tokens = Some(Arc::new(
        TokenSet::parse(&token_line("pipeline-a", "tok-a-123"), "test").unwrap(),
    ));
    config.audit_log = Some(audit.clone());
    let srv = TestServer::start(config, models()).await;
    let ch = Endpoint::from_shared(srv.url())
        .unwrap()
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect()
        .await
        .unwrap();
    let mut client = InferenceClient::new(ch.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(h.into_inner().status, 1);

    let (code, _) = call_with(&mut client, None, 1024).await;
    assert_eq!(code, tonic::Code::Unauthenticated);
    let (code, _) = call_with(&mut client, Some("tok-b-wrong"), 1024).await;
    assert_eq!(code, tonic::Code::Unauthenticated);
    let (code, _) = call_with(&mut client, Some("tok-a-123"), 4096).await;
    assert_eq!(code, tonic::Code::Ok, "a valid token is served");

    // Refused before the body is read: 64 MiB costs what 1 KiB does (medians of 5).
    let mut small = Vec::new();
    let mut big = Vec::new();
    for _ in 0..5 {
        let (c1, t1) = call_with(&mut client, Some("nope"), 1024).await;
        let (c2, t2) = call_with(&mut client, Some("nope"), 64 << 20).await;
        assert_eq!(
            (c1, c2),
            (tonic::Code::Unauthenticated, tonic::Code::Unauthenticated)
        );
        small.push(t1);
        big.push(t2);
    }
    small.sort();
    big.sort();
    println!(
        "tokens: UNAUTHENTICATED in {:?} for a 1 KiB body, {:?} for 64 MiB (medians of 5; the \
         64 MiB includes the client encoding it)",
        small[2], big[2]
    );
    // Only the authenticated call reached the pool.
    assert_eq!(
        srv.stats
            .completed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    let summary = voxconv::obs::audit::audit_summary(&text);
    assert_eq!(summary.get("UNAUTHENTICATED"), Some(&12), "{text}");
    assert_eq!(summary.get("OK"), Some(&1), "{text}");
    assert!(text.contains("\"caller\":\"token:pipeline-a\""), "{text}");
    assert!(
        !text.contains("tok-a-123") && !text.contains("nope"),
        "a token reached the audit log"
    );
}

/// A writer the test's tracing subscriber logs into.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_in_the_volume_reaches_no_log_line() {
    // Global: the server logs from its runtime's and the pool's threads.
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    let logs = LOGS
        .get_or_init(|| {
            let logs = Captured::default();
            let sink = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("voxconv=trace")
                .with_writer(move || sink.clone())
                .json()
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        })
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = Config::for_tests();
    config.audit_log = Some(audit.clone());
    let srv = TestServer::start(config, models()).await;
    let mut client = srv.client().await;
    // A canary voxel value, and as a model name the patient id a careless client might send.
    let canary = 7_654_321.5f32;
    let mut req = tiny_request();
    req.input.as_mut().unwrap().data = f32_bytes(&[canary; 64]);
    client.infer(req.clone()).await.unwrap();
    req.model = "PATIENT-4711-DOE".into();
    assert_eq!(
        client.infer(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains("call finished"),
        "the subscriber saw nothing: {log}"
    );
    for text in [&log, &trail] {
        for needle in ["7654321", "7.654321", "PATIENT-4711"] {
            assert!(!text.contains(needle), "{needle} leaked: {text}");
        }
    }
    println!(
        "canary: {} log bytes and {} audit lines checked, no voxel value or identifier",
        log.len(),
        trail.lines().count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_and_the_server_serves_on() {
    let srv = TestServer::start(Config::for_tests(), models()).await;
    let mut client = srv
        .client()
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_encoding_message_size(usize::MAX);
    // 256 MiB of zeros compress to ~256 KiB; the limit is 4 MiB decompressed.
    let n = 64 << 20;
    let req = unary(
        "sobel3d",
        pb::DType::Fp32,
        &[1, 1, 256, 512, 512],
        bytes::Bytes::from(vec![0u8; n * 4]),
    );
    let t0 = Instant::now();
    let e = client.infer(req).await.unwrap_err();
    println!(
        "gzip bomb: {:?} after {:?}: {}",
        e.code(),
        t0.elapsed(),
        e.message()
    );
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let mut client = srv.client().await;
    client.infer(tiny_request()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_burst_is_refused_quickly_and_the_queue_stays_bounded() {
    let mut config = Config::for_tests();
    config.workers = 1;
    config.queue_len = 2;
    let srv = TestServer::start(config, models()).await;
    let client = srv.client().await;
    // Capacity: 1 running + 2 queued. Burst: 15 calls of ~10 ms each (Gaussian 5x5x5 on
    // 96^3; input and output 3.4 MiB, under the 4 MiB message limit) at once.
    let shape = vec![1u64, 1, 96, 96, 96];
    let x = f32_bytes(&voxconv::kernel::seeded(96 * 96 * 96, 3));
    let stats = Arc::clone(&srv.stats);
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = {
        let (stats, watching) = (Arc::clone(&stats), Arc::clone(&watching));
        tokio::spawn(async move {
            let mut peak = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(stats.queued.load(std::sync::atomic::Ordering::Relaxed));
                tokio::task::yield_now().await;
            }
            peak
        })
    };
    let calls = (0..15).map(|_| {
        let mut c = client.clone();
        let req = unary("gaussian3d", pb::DType::Fp32, &shape, x.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = c.infer(req).await;
            (
                r.map(|_| ())
                    .map_err(|e| (e.code(), e.message().to_string())),
                t0.elapsed(),
            )
        })
    });
    let mut ok = 0;
    let mut refused = Vec::new();
    for h in futures_join(calls.collect()).await {
        match h {
            (Ok(()), _) => ok += 1,
            (Err((tonic::Code::ResourceExhausted, m)), t) => {
                assert!(m.contains("queue"), "refused for another reason: {m}");
                refused.push(t)
            }
            (Err(c), _) => panic!("unexpected {c:?}"),
        }
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = peak.await.unwrap();
    refused.sort();
    assert!(!refused.is_empty(), "no call was refused");
    assert!(ok >= 3, "only {ok} served");
    assert!(peak <= 2, "queue reached {peak} > 2");
    println!(
        "overload: 15 calls at once on capacity 3: {ok} served, {} RESOURCE_EXHAUSTED (median \
         {:?}, max {:?}); queue peak {peak} (limit 2)",
        refused.len(),
        refused[refused.len() / 2],
        refused.last().unwrap()
    );
    // Served again once the burst is over.
    srv.client().await.infer(tiny_request()).await.unwrap();
}

async fn futures_join<T: Send + 'static>(hs: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_by_connection_age() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = Config::for_tests();
    config.limits.max_connection_age = Duration::from_millis(800);
    config.limits.max_connection_age_grace = Duration::from_millis(400);
    let srv = TestServer::start(config, models()).await;
    // An HTTP/2 client that says hello (preface + empty SETTINGS) and then nothing.
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open for 10 s");
    println!(
        "connection age: a silent HTTP/2 connection was sent GOAWAY at its age and closed {:?} \
         after it went quiet (--max-connection-age 800 ms; it answers no PING, so closed at \
         the end of the 400 ms grace)",
        t0.elapsed()
    );
    // Others are still served.
    srv.client().await.infer(tiny_request()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_streams_are_answered_before_their_body_is_sent() {
    let mut config = Config::for_tests();
    config.auth_tokens = Some(Arc::new(
        TokenSet::parse(&token_line("pipeline-a", "tok-a-123"), "test").unwrap(),
    ));
    let srv = TestServer::start(config, models()).await;
    let mut client = srv.client().await;
    // The header announces a 64 MiB volume; its chunks would only follow the answer, so a
    // server that waited for the body before refusing would never answer.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(crate::common::header(
        "sobel3d",
        &[1, 1, 256, 256, 256],
        pb::DType::Fp32,
        0,
    ))
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), client.infer_stream(req))
        .await
        .expect("the server waited for the body before answering");
    let took = t0.elapsed();
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);
    drop(tx);
    assert_eq!(
        srv.stats
            .completed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    println!(
        "tokens: an InferStream announcing 64 MiB refused in {took:?}, before any of its chunks \
         was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_sends_no_http2_preface_is_closed_at_the_deadline() {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let p = pki();
    let mut config = Config::for_tests();
    config.tls = Some(TlsSettings {
        cert: p.server_cert.clone().into_bytes(),
        key: p.server_key.clone().into_bytes(),
        client_ca: None,
        handshake_timeout: Duration::from_secs(5),
    });
    config.limits.http2_preface_timeout = Duration::from_millis(600);
    let srv = TestServer::start(config, models()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(p.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    // The handshake completes; then the client says nothing.
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("handshake");
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the server's SETTINGS
            }
        }
    })
    .await;
    let t = t0.elapsed().as_secs_f64();
    assert!(
        closed.is_ok(),
        "a TLS client without a preface stayed open 5 s"
    );
    assert!((0.5..2.0).contains(&t), "closed after {t:.2} s");
    println!(
        "TLS preface deadline: a client that completed its handshake and sent no HTTP/2 preface \
         was closed after {t:.2} s (--http2-preface-timeout 600 ms)"
    );
    // A client that does speak is served.
    let ch = tls_channel(srv.addr, &p.ca_pem, None).await.unwrap();
    InferenceClient::new(ch)
        .infer(tiny_request())
        .await
        .unwrap();
}
