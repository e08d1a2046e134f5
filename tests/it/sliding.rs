//! Sliding-window inference against MONAI's `sliding_window_inference` on the committed
//! fixtures of `tests/fixtures/sliding` (made by `scripts/make_sliding_fixtures.py`: a small
//! MONAI UNet with a dynamic batch and a fixed non-cubic window, scans that are not
//! multiples of the window, one smaller than it along D, N = 2, gaussian and constant
//! blending, per-axis overlap and sigma, sw_batch_size 3, nnU-Net mirroring); then the same
//! through the server: streamed labels with progress, the options' errors, KServe
//! parameters, GetModel's defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use serde::Deserialize;
use tonic::Code;
use voxconv::config::Config;
use voxconv::model::repo::{load_model, ModelRegistry};
use voxconv::model::sliding::{Blend, PerAxis, WindowOutput, WindowRequest};
use voxconv::proto::inference as kv;
use voxconv::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use voxconv::proto::voxconv::v1 as pb;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sliding")
}

fn npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a: ndarray::ArrayD<f32> = ndarray_npy::read_npy(path).unwrap();
    (a.shape().to_vec(), a.iter().copied().collect())
}

#[derive(Deserialize)]
struct Case {
    name: String,
    scan: String,
    expected: String,
    roi: [usize; 3],
    overlap: [f64; 3],
    blend: String,
    sigma_scale: [f64; 3],
    batch: usize,
    mirror: Vec<usize>,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

fn request(c: &Case, output: WindowOutput) -> WindowRequest {
    WindowRequest {
        roi: Some(c.roi),
        overlap: Some(PerAxis::Three(c.overlap)),
        blend: Some(match c.blend.as_str() {
            "gaussian" => Blend::Gaussian,
            "constant" => Blend::Constant,
            other => panic!("blend {other}"),
        }),
        sigma_scale: Some(PerAxis::Three(c.sigma_scale)),
        batch: Some(c.batch),
        mirror: Some(c.mirror.clone()),
        output: Some(output),
    }
}

/// Per voxel of `[N, K, D, H, W]` logits: argmax (first on ties) and whether the top two
/// are within `tie` of each other.
fn argmax(logits: &[f32], shape: &[usize], tie: f32) -> Vec<(usize, bool)> {
    let (n, k) = (shape[0], shape[1]);
    let plane: usize = shape[2..].iter().product();
    let mut out = Vec::with_capacity(n * plane);
    for b in 0..n {
        for v in 0..plane {
            let vals: Vec<f32> = (0..k).map(|c| logits[(b * k + c) * plane + v]).collect();
            let mut best = 0;
            for c in 1..k {
                if vals[c] > vals[best] {
                    best = c;
                }
            }
            let close = (0..k).any(|c| c != best && vals[best] - vals[c] <= tie);
            out.push((best, close));
        }
    }
    out
}

/// Every case: blended logits within 1e-4 × max|ref| of MONAI's (NaN-prefilled output, all
/// overwritten), the same bits at 1 and 2 threads; labels equal MONAI's argmax on ≥ 99.99 %
/// of voxels (ties aside); probabilities the softmax of MONAI's logits.
#[test]
fn windows_match_monai() {
    let dir = fixtures();
    let m = load_model(&dir.join("repo/tiny_unet"), "tiny_unet").unwrap();
    for c in cases() {
        let (shape, x) = npy(&dir.join(&c.scan));
        let (want_shape, want) = npy(&dir.join(&c.expected));
        let scan: [usize; 5] = shape.clone().try_into().unwrap();
        let plan = m
            .plan_sliding(scan, &request(&c, WindowOutput::Logits), 2)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(plan.output.to_vec(), want_shape, "{}", c.name);
        let mut runs = Vec::new();
        for threads in [1, 2] {
            let mut got = vec![f32::NAN; plan.output_len()];
            plan.run_to(&m, x.clone(), threads, None, &mut got).unwrap();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{}: {threads} threads: max error / max|ref| = {:.2e}",
                c.name,
                err / scale
            );
            assert!(
                err <= 1e-4 * scale,
                "{} at {threads} threads: max error {err} vs max|ref| {scale}",
                c.name
            );
            runs.push(got);
        }
        assert!(
            runs[0]
                .iter()
                .zip(&runs[1])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: 1 and 2 threads differ",
            c.name
        );

        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let lplan = m
            .plan_sliding(scan, &request(&c, WindowOutput::Labels), 2)
            .unwrap();
        assert_eq!(lplan.output[1], 1);
        let mut labels = vec![f32::NAN; lplan.output_len()];
        lplan.run_to(&m, x.clone(), 2, None, &mut labels).unwrap();
        let reference = argmax(&want, &want_shape, 1e-4 * scale);
        let (mut agree, mut counted) = (0usize, 0usize);
        for (got, (best, tie)) in labels.iter().zip(&reference) {
            if *tie {
                continue;
            }
            counted += 1;
            agree += usize::from(*got as usize == *best);
        }
        assert!(counted > labels.len() / 2, "{}: too many ties", c.name);
        assert!(
            agree as f64 >= 0.9999 * counted as f64,
            "{}: labels agree on {agree} of {counted}",
            c.name
        );

        let pplan = m
            .plan_sliding(scan, &request(&c, WindowOutput::Probabilities), 2)
            .unwrap();
        let mut p = vec![f32::NAN; pplan.output_len()];
        pplan.run_to(&m, x.clone(), 2, None, &mut p).unwrap();
        let (k, plane) = (want_shape[1], want_shape[2..].iter().product::<usize>());
        for b in 0..want_shape[0] {
            for v in 0..plane {
                let l: Vec<f64> = (0..k)
                    .map(|ch| f64::from(want[(b * k + ch) * plane + v]))
                    .collect();
                let mx = l.iter().copied().fold(f64::MIN, f64::max);
                let sum: f64 = l.iter().map(|a| (a - mx).exp()).sum();
                for ch in 0..k {
                    let ref_p = (l[ch] - mx).exp() / sum;
                    let got = f64::from(p[(b * k + ch) * plane + v]);
                    assert!((got - ref_p).abs() < 1e-4, "{}: p {got} vs {ref_p}", c.name);
                }
            }
        }
    }
}

fn sliding_header(
    shape: &[u64],
    window: pb::SlidingWindow,
    out: pb::DType,
) -> pb::InferStreamRequest {
    pb::InferStreamRequest {
        msg: Some(pb::infer_stream_request::Msg::Header(pb::StreamHeader {
            model: "tiny_unet".into(),
            input_dtype: pb::DType::Fp32 as i32,
            input_shape: shape.to_vec(),
            output_dtype: out as i32,
            sliding_window: Some(window),
            ..Default::default()
        })),
    }
}

/// The server: labels stream as UINT8 slabs in depth order with progress up to the total,
/// equal to the in-process result; bad options are INVALID_ARGUMENT naming the field;
/// KServe takes the options as parameters; GetModel reports defaults and scan memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_streamed_and_checked() {
    let repo = fixtures().join("repo");
    let (reg, report) = ModelRegistry::with_repository(repo.clone()).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut server = TestServer::start_registry(Config::for_tests(), Arc::new(reg)).await;
    let mut client = server.client().await;
    let c = &cases()[0];
    let (shape, x) = npy(&fixtures().join(&c.scan));
    let (want_shape, want) = npy(&fixtures().join(&c.expected));
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let window = pb::SlidingWindow {
        overlap: c.overlap.to_vec(),
        output: pb::WindowOutput::Labels as i32,
        ..Default::default()
    };
    let mut reqs = vec![sliding_header(
        &shape64,
        window.clone(),
        pb::DType::DtypeUnspecified,
    )];
    reqs.extend(chunks(&f32_bytes(&x), 4096));
    let mut s = client
        .infer_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut last_progress, mut summary) = (Vec::new(), (0, 0), None);
    while let Some(msg) = s.message().await.unwrap() {
        match msg.msg.unwrap() {
            pb::infer_stream_response::Msg::Header(h) => {
                assert_eq!(h.dtype, pb::DType::Uint8 as i32);
                assert_eq!(h.shape, vec![1, 1, 29, 23, 31]);
                out = vec![0xAAu8; h.total_bytes as usize];
            }
            pb::infer_stream_response::Msg::Chunk(ch) => {
                let at = ch.offset as usize;
                out[at..at + ch.data.len()].copy_from_slice(&ch.data);
            }
            pb::infer_stream_response::Msg::Progress(p) => {
                assert!(p.windows_done > last_progress.0);
                last_progress = (p.windows_done, p.windows_total);
            }
            pb::infer_stream_response::Msg::Summary(sm) => summary = Some(sm),
        }
    }
    let summary = summary.unwrap();
    assert_eq!(last_progress, (18, 18), "progress up to every window");
    assert_eq!(summary.windows, 18);
    assert_eq!(summary.output_bytes, out.len() as u64);
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let reference = argmax(&want, &want_shape, 1e-4 * scale);
    let wrong = out
        .iter()
        .zip(&reference)
        .filter(|(got, (best, tie))| !tie && **got as usize != *best)
        .count();
    assert!(wrong * 10_000 <= out.len(), "{wrong} labels differ");

    // Bad options: INVALID_ARGUMENT naming the field and what is allowed.
    let bad = |f: fn(&mut pb::SlidingWindow)| {
        let mut w = window.clone();
        f(&mut w);
        w
    };
    let cases: Vec<(pb::SlidingWindow, pb::DType, &str)> = vec![
        (
            bad(|w| w.overlap = vec![1.0]),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.overlap: expected values in [0, 1)",
        ),
        (
            bad(|w| w.overlap = vec![0.1, 0.2]),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.overlap: expected 1 value",
        ),
        (
            bad(|w| w.roi = vec![16, 16, 16]),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.roi: the model takes windows of exactly [16, 12, 20]",
        ),
        (
            bad(|w| w.mirror = Some(pb::MirrorAxes { axes: vec![3] })),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.mirror: expected spatial axes among 0 (D), 1 (H), 2 (W)",
        ),
        (
            bad(|w| w.output = 9),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.output: expected WINDOW_OUTPUT_LOGITS",
        ),
        (
            bad(|w| w.blend = 5),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.blend: expected BLEND_GAUSSIAN or BLEND_CONSTANT",
        ),
        (
            bad(|w| w.sigma_scale = vec![0.0]),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.sigma_scale: expected finite values > 0",
        ),
        (
            bad(|w| w.batch = 1000),
            pb::DType::DtypeUnspecified,
            "header.sliding_window.batch: expected 1 to 64",
        ),
        (
            window.clone(),
            pb::DType::Fp16,
            "header.output_dtype: labels of 3 classes are UINT8 or UINT16, got FP16",
        ),
    ];
    for (w, dtype, want) in cases {
        let reqs = vec![sliding_header(&shape64, w, dtype)];
        let e = client
            .infer_stream(tokio_stream::iter(reqs))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(want), "{} / {want}", e.message());
    }

    // Unary Infer takes the same options (the output must fit one message).
    let r = client
        .infer(pb::InferRequest {
            model: "tiny_unet".into(),
            input: Some(pb::Tensor {
                dtype: pb::DType::Fp32 as i32,
                shape: shape64.clone(),
                data: f32_bytes(&x),
            }),
            output_dtype: 0,
            sliding_window: Some(window.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let t = r.output.unwrap();
    assert_eq!(t.dtype, pb::DType::Uint8 as i32);
    assert_eq!(t.data.as_ref(), &out[..], "unary labels = streamed labels");
    assert_eq!(r.summary.unwrap().windows, 18);

    // The scan is consumed as it arrives: an upload that stops short or skips ahead is
    // INVALID_ARGUMENT while the windows wait for it, and the server goes on serving.
    let all = chunks(&f32_bytes(&x), 4096);
    for (reqs, want) in [
        (all[..all.len() / 2].to_vec(), "chunk: input ended after"),
        ([&all[..3], &all[4..]].concat(), "chunk.offset: expected"),
    ] {
        let mut r = vec![sliding_header(
            &shape64,
            window.clone(),
            pb::DType::DtypeUnspecified,
        )];
        r.extend(reqs);
        let mut s = client
            .infer_stream(tokio_stream::iter(r))
            .await
            .unwrap()
            .into_inner();
        let e = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error ({want})"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(want), "{} / {want}", e.message());
    }

    // KServe: the same call as request parameters; labels come back as UINT8.
    let mut k = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();
    let param = |p: kv::infer_parameter::ParameterChoice| kv::InferParameter {
        parameter_choice: Some(p),
    };
    use kv::infer_parameter::ParameterChoice as P;
    let mut req = kv::ModelInferRequest {
        model_name: "tiny_unet".into(),
        inputs: vec![kv::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x)],
        ..Default::default()
    };
    req.parameters
        .insert("sliding_window".into(), param(P::BoolParam(true)));
    req.parameters
        .insert("output".into(), param(P::StringParam("labels".into())));
    let r = k.model_infer(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.outputs[0].datatype, "UINT8");
    assert_eq!(r.outputs[0].shape, vec![1, 1, 29, 23, 31]);
    assert_eq!(r.raw_output_contents[0].as_ref(), &out[..], "same labels");
    let mut big = req.clone();
    big.parameters
        .insert("sw_batch_size".into(), param(P::Int64Param(1000)));
    let e = k.model_infer(big).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("parameters.batch: expected 1 to 64"),
        "{}",
        e.message()
    );
    req.parameters
        .insert("overlap".into(), param(P::DoubleParam(-0.5)));
    let e = k.model_infer(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("parameters.overlap"),
        "{}",
        e.message()
    );
    req.parameters.remove("sliding_window");
    let e = k.model_infer(req).await.unwrap_err();
    assert!(
        e.message().contains("set parameters.sliding_window"),
        "{}",
        e.message()
    );

    // GetModel: the defaults and the memory a scan needs (bounded by the window rows).
    let info = client
        .get_model(pb::GetModelRequest {
            name: "tiny_unet".into(),
            scan_shape: vec![1, 1, 400, 64, 64],
        })
        .await
        .unwrap()
        .into_inner();
    let d = info.sliding_window.unwrap();
    assert_eq!(d.roi, vec![16, 12, 20]);
    assert_eq!(d.overlap, vec![0.25; 3]);
    assert_eq!(d.output, pb::WindowOutput::Logits as i32);
    // A single-channel scan is consumed as it arrives: less than the scan itself, and the
    // same whatever its depth.
    let scan_input = 400 * 64 * 64 * 4;
    assert!(info.scan_working_bytes > 0 && info.scan_working_bytes < scan_input);
    let deeper = client
        .get_model(pb::GetModelRequest {
            name: "tiny_unet".into(),
            scan_shape: vec![1, 1, 4000, 64, 64],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deeper.scan_working_bytes, info.scan_working_bytes);
    server.shutdown();
}
