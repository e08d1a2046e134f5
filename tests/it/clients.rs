//! The client subcommands run as a user would, against a real server on 127.0.0.1:0:
//! `voxconv phantom` -> `voxconv infer` with NIfTI files, `voxconv bench --json`, and
//! `voxconv ghz-data` requests sent as they are.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::TestServer;
use prost::Message;
use voxconv::config::Config;
use voxconv::model::repo::ModelRegistry;
use voxconv::tensor::dtype::DType;
use voxconv::tensor::nifti::{affine, read_scan};

fn voxconv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_voxconv"))
}

async fn server() -> TestServer {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let (reg, _) = ModelRegistry::with_repository(repo).unwrap();
    let mut config = Config::for_tests();
    config.workers = 2;
    TestServer::start_registry(config, Arc::new(reg)).await
}

/// Runs a blocking command while the server keeps running on the runtime's workers.
async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phantom_through_a_strided_model_keeps_its_place_in_space() {
    let srv = server().await;
    let dir = tempfile::tempdir().unwrap();
    let ph = dir.path().join("ph.nii.gz");
    let out = dir.path().join("tn.nii.gz");
    let mut cmd = voxconv();
    cmd.args(["phantom", "--size", "20", "--voxel-mm", "0.5", "--output"])
        .arg(&ph);
    assert!(run(cmd).await.status.success());
    let mut cmd = voxconv();
    cmd.args([
        "infer",
        "--server",
        &srv.url(),
        "--model",
        "tiny_net",
        "--input",
    ])
    .arg(&ph)
    .arg("--output")
    .arg(&out);
    let o = run(cmd).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // The int16 phantom travels as INT16: 2 bytes a voxel.
    assert!(err.contains("sent INT16 [1, 1, 20, 20, 20]"), "{err}");

    let input = read_scan(&ph).unwrap();
    assert_eq!(input.dtype, DType::I16);
    let output = read_scan(&out).unwrap();
    // tiny_net: conv p1, maxpool 2, conv k3 p(1,0,1) d(1,1,2) -> [1, 3, 10, 8, 8].
    assert_eq!(output.shape, [1, 3, 10, 8, 8]);
    assert_eq!(output.dtype, DType::F32);
    // Output voxel (0,0,0) sits at input voxel (x, y, z) = (2.5, 2.5, 0.5), voxels twice as
    // large (see scripts/check_nifti.py for the full check with nibabel).
    let a_in = affine(&input.header);
    let a_out = affine(&output.header);
    let world = |m: &[[f64; 4]; 3], v: [f64; 3]| {
        [0, 1, 2].map(|i| m[i][0] * v[0] + m[i][1] * v[1] + m[i][2] * v[2] + m[i][3])
    };
    for (o, i) in [
        ([0.0, 0.0, 0.0], [2.5, 2.5, 0.5]),
        ([1.0, 2.0, 3.0], [4.5, 6.5, 6.5]),
    ] {
        let (wo, wi) = (world(&a_out, o), world(&a_in, i));
        for k in 0..3 {
            assert!((wo[k] - wi[k]).abs() < 1e-4, "{o:?}: {wo:?} vs {wi:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_percentiles_and_errors_by_code() {
    let srv = server().await;
    let mut cmd = voxconv();
    cmd.args(["bench", "--server", &srv.url(), "--workload", "tiny"])
        .args(["--concurrency", "3", "--requests", "30", "--json"]);
    let o = run(cmd).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["model"], "bench-tiny");
    assert_eq!(r["requests"], 30);
    assert_eq!(r["ok"], 30);
    assert_eq!(r["errors"], serde_json::json!({}));
    let lat = &r["latency_ms"];
    let p = |k: &str| lat[k].as_f64().unwrap();
    assert!(
        p("p50") > 0.0 && p("p50") <= p("p99") && p("p99") <= p("max"),
        "{lat}"
    );
    // bench-tiny: [2, 3, 16^3] float32 in, [2, 8, 14^3] float32 out, per request.
    assert_eq!(r["input_bytes"], 30 * 2 * 3 * 16 * 16 * 16 * 4);
    assert_eq!(r["output_bytes"], 30 * 2 * 8 * 14 * 14 * 14 * 4);

    // A wrong shape: every request fails, counted under its status code.
    let mut cmd = voxconv();
    cmd.args(["bench", "--server", &srv.url(), "--model", "sobel3d"])
        .args([
            "--shape",
            "1,2,8,8,8",
            "--requests",
            "4",
            "--rpc",
            "infer",
            "--json",
        ]);
    let o = run(cmd).await;
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], 0);
    assert_eq!(r["errors"], serde_json::json!({"INVALID_ARGUMENT": 4}));
    assert!(
        r["first_error"].as_str().unwrap().contains("channels"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ghz_data_is_a_request_the_server_answers() {
    let srv = server().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("tiny.bin");
    let mut cmd = voxconv();
    cmd.args(["ghz-data", "--workload", "tiny", "--output"])
        .arg(&bin);
    assert!(run(cmd).await.status.success());
    let req =
        voxconv::proto::voxconv::v1::InferRequest::decode(std::fs::read(&bin).unwrap().as_slice())
            .unwrap();
    let mut client = srv.client().await;
    let r = client.infer(req).await.unwrap().into_inner();
    assert_eq!(r.output.unwrap().shape, vec![2, 8, 14, 14, 14]);
}
