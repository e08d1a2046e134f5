//! A request whose output is larger than 256 MiB streams through while the server's memory
//! stays bounded by its working set, not by the output size. Its own test binary, so the
//! process's peak RSS (VmHWM) belongs to this test alone.

mod common;

use common::*;
use voxconv::config::Config;
use voxconv::proto::voxconv::v1 as pb;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_larger_than_256_mib_streams_in_bounded_memory() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("no /proc: skipped");
        return;
    }
    let mut config = Config::for_tests();
    config.threads_per_job = 2;
    config.chunk_bytes = 1 << 20;
    let server = TestServer::start(config, models()).await;
    let mut client = server.client().await;
    let side = 168u64; // 16 channels × 168³ × 4 bytes = 303 MB of output
    let n = (side * side * side) as usize;
    let input: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let input = bytes::Bytes::from(input);
    let mut reqs = vec![header(
        "c16",
        &[1, 1, side, side, side],
        pb::DType::Uint8,
        0,
    )];
    reqs.extend(chunks(&input, 1 << 20));
    let mut s = client
        .infer_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut total = 0u64;
    let mut announced = 0;
    let mut nonzero = 0u64;
    while let Some(m) = s.message().await.unwrap() {
        match m.msg.unwrap() {
            pb::infer_stream_response::Msg::Header(h) => announced = h.total_bytes,
            pb::infer_stream_response::Msg::Chunk(c) => {
                total += c.data.len() as u64;
                nonzero += c
                    .data
                    .chunks_exact(4)
                    .filter(|b| b != &[0, 0, 0, 0])
                    .count() as u64;
            }
            pb::infer_stream_response::Msg::Summary(sm) => assert_eq!(sm.output_bytes, total),
            pb::infer_stream_response::Msg::Progress(_) => {}
        }
    }
    assert_eq!(total, announced);
    assert!(total > 256 << 20, "output {total} bytes");
    assert!(nonzero > 0);
    let peak = peak_rss_bytes();
    let input_f32 = n as u64 * 4;
    let bound = input_f32 + input.len() as u64 + (96 << 20);
    eprintln!(
        "output {} MiB, peak RSS {} MiB, bound {} MiB",
        total >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(peak < bound, "peak RSS {peak} exceeds {bound}");
}
