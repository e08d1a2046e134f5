//! ONNX U-Nets (MONAI BasicUNet, UNet, SegResNet; nnU-Net PlainConvUNet) from
//! `tests/fixtures/onnx` (made by `scripts/export_onnx.py`: seeded weights, the
//! onnxruntime output beside each model) against onnxruntime, in process and over KServe
//! by the graph's tensor names; and every kind of bad file a load error, never a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use prost::Message;
use tonic::Code;
use voxconv::config::Config;
use voxconv::model::repo::{load_model, ModelRegistry};
use voxconv::proto::inference as kv;
use voxconv::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use voxconv::proto::onnx as ox;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a: ndarray::ArrayD<f32> = ndarray_npy::read_npy(path).unwrap();
    (a.shape().to_vec(), a.iter().copied().collect())
}

/// Max |got − want| and max |want|.
fn err_and_scale(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    (err, scale)
}

const NETS: [&str; 5] = [
    "monai_basicunet",
    "monai_unet",
    "monai_segresnet",
    "nnunet_plainconv",
    "monai_basicunet_dynamic",
];

/// Each network's output equals onnxruntime's within 1e-4 × max|ref| (the NaN-prefilled
/// output buffer is fully overwritten), at 1 and 2 threads with the same bits.
#[test]
fn unets_match_onnxruntime() {
    for name in NETS {
        let dir = fixtures().join(name);
        let m = load_model(&dir, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut cases = vec![("input.npy", "expected.npy")];
        if dir.join("input2.npy").exists() {
            cases.push(("input2.npy", "expected2.npy"));
        }
        for (inp, exp) in cases {
            let (shape, x) = npy(&dir.join(inp));
            let (want_shape, want) = npy(&dir.join(exp));
            let shape: [usize; 5] = shape.try_into().unwrap();
            let plan = m
                .plan(shape)
                .unwrap_or_else(|e| panic!("{name} {inp}: {e}"));
            assert_eq!(plan.output.to_vec(), want_shape, "{name} {inp}");
            let mut outs = Vec::new();
            for threads in [1, 2] {
                let mut got = vec![f32::NAN; plan.output_len()];
                plan.run_to(&m, x.clone(), threads, None, &mut got)
                    .unwrap_or_else(|e| panic!("{name} {inp}: {e}"));
                let (err, scale) = err_and_scale(&got, &want);
                assert!(
                    err <= 1e-4 * scale,
                    "{name} {inp} at {threads} threads: max error {err} vs max|ref| {scale}"
                );
                outs.push(got);
            }
            assert!(
                outs[0]
                    .iter()
                    .zip(&outs[1])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {inp}: 1 and 2 threads differ"
            );
        }
    }
}

/// SegResNet's GroupNorm, exported as `Reshape → InstanceNormalization → Reshape → Mul →
/// Add` (+ Relu), is planned as one GroupNorm step per norm: no Reshape, Mul or Relu step
/// is left, and the output still matches onnxruntime (`unets_match_onnxruntime`).
#[test]
fn decomposed_group_norms_are_fused() {
    let name = "monai_segresnet";
    let dir = fixtures().join(name);
    let m = load_model(&dir, name).unwrap();
    let g = m.graph().expect("an ONNX graph");
    let norms = g
        .nodes
        .iter()
        .filter(|n| n.op.name() == "InstanceNormalization")
        .count();
    assert!(norms > 0);
    let (shape, _) = npy(&dir.join("input.npy"));
    let plan = g.plan(shape.try_into().unwrap()).unwrap();
    let steps = plan.strategies();
    let count = |op: &str| steps.iter().filter(|(_, s)| *s == op).count();
    assert_eq!(count("GroupNormalization"), norms, "{steps:?}");
    for op in ["InstanceNormalization", "Reshape", "Mul", "Relu"] {
        assert_eq!(count(op), 0, "{op} left: {steps:?}");
    }
}

/// A caller running the same plan again with one arena (sliding windows: window after
/// window) gets the same bits as a fresh run, and the arena settles: it holds at most one
/// input and one output more than after the first run, so nothing piles up window after
/// window.
#[test]
fn runs_sharing_an_arena_reuse_it() {
    // Activations large enough for the arena (it leaves small ones to the allocator).
    let name = "monai_basicunet_dynamic";
    let dir = fixtures().join(name);
    let m = load_model(&dir, name).unwrap();
    let shape = [1, 1, 48, 48, 32];
    let x = voxconv::kernel::seeded(shape.iter().product(), 7);
    let plan = m.plan(shape).unwrap();
    let mut want = vec![f32::NAN; plan.output_len()];
    plan.run_to(&m, x.clone(), 2, None, &mut want).unwrap();
    let mut arena = voxconv::model::graph::Arena::default();
    let mut held = Vec::new();
    for threads in [1, 2, 1, 3, 2] {
        let (got, _) = plan
            .run_whole(&m, x.clone(), threads, None, &mut arena)
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        arena.give_vec(got);
        held.push(arena.held_bytes());
    }
    // At most one run's input and one output more than the first run kept (the last
    // output is given back after the run), and steady from then on.
    let io = (x.len() + want.len()) * 4;
    assert!(held[0] > 0, "{held:?}");
    assert!(held.iter().all(|&h| h <= held[0] + io), "{held:?}");
    assert!(held[2..].windows(2).all(|w| w[0] == w[1]), "{held:?}");
}

/// Plain runs keep the graph's arena for the next run (of any of its plans): run after run,
/// at any thread count and with another input shape in between, the same bits as the first
/// run, and the idle arena holds no more than one run's working memory plus its input.
#[test]
fn repeated_runs_reuse_the_graph_arena() {
    let name = "monai_basicunet_dynamic";
    let dir = fixtures().join(name);
    let m = load_model(&dir, name).unwrap();
    let g = m.graph().unwrap();
    assert_eq!(g.idle_arena_bytes(), 0);
    let (a, b) = ([1, 1, 48, 48, 32], [1, 1, 32, 32, 32]);
    let (xa, xb) = (
        voxconv::kernel::seeded(a.iter().product(), 3),
        voxconv::kernel::seeded(b.iter().product(), 4),
    );
    let (pa, pb) = (m.plan(a).unwrap(), m.plan(b).unwrap());
    let run = |p: &voxconv::model::ModelPlan, x: &[f32], threads| {
        // NaN-prefilled: every output value must be written.
        let mut out = vec![f32::NAN; p.output_len()];
        p.run_to(&m, x.to_vec(), threads, None, &mut out).unwrap();
        out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let (want_a, want_b) = (run(&pa, &xa, 1), run(&pb, &xb, 1));
    assert!(g.idle_arena_bytes() > 0);
    let bound = pa.working_bytes(3) + xa.len() * 4;
    for threads in [2, 3, 1, 2] {
        assert_eq!(run(&pa, &xa, threads), want_a, "{threads} threads");
        assert!(
            g.idle_arena_bytes() <= bound,
            "{} > {bound}",
            g.idle_arena_bytes()
        );
        assert_eq!(run(&pb, &xb, threads), want_b, "{threads} threads");
    }
    // Idle arenas are counted process-wide (other tests may hold some too).
    assert!(voxconv::model::graph::idle_arena_total() >= g.idle_arena_bytes());
}

/// What a plain run's arena comes to hold (every buffer allocated in the run, the caller's
/// input and the recycled output) stays within the working memory the plan reports (plus
/// the input), for every network fixture: the memory budget counts what a run really holds.
#[test]
fn the_reported_working_memory_covers_the_kept_arena() {
    for name in [
        "monai_basicunet",
        "monai_segresnet",
        "monai_unet",
        "nnunet_plainconv",
    ] {
        let m = load_model(&fixtures().join(name), name).unwrap();
        let g = m.graph().unwrap();
        let shape = g.declared_input().unwrap();
        let p = m.plan(shape).unwrap();
        let x = voxconv::kernel::seeded(shape.iter().product(), 5);
        let mut out = vec![f32::NAN; p.output_len()];
        for _ in 0..2 {
            p.run_to(&m, x.clone(), 1, None, &mut out).unwrap();
        }
        let (held, working) = (g.idle_arena_bytes(), p.working_bytes(1));
        assert!(
            held <= working + x.len() * 4,
            "{name}: {held} > {working} + input"
        );
    }
}

fn kserve_request(model: &str, input: &str, shape: &[usize], x: &[f32]) -> kv::ModelInferRequest {
    kv::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![kv::model_infer_request::InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape: shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(x)],
        ..Default::default()
    }
}

/// KServe names tensors as the graph does (`image` / `logits`), reports the graph's dims,
/// answers by them, and refuses the stack names and a size the graph does not take with
/// INVALID_ARGUMENT naming what it expects; GetModel reports the format, tensors, ops and
/// working memory; `voxconv infer` runs an ONNX model unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_by_the_graphs_names() {
    let (reg, report) = ModelRegistry::with_repository(fixtures()).unwrap();
    for n in NETS {
        assert!(report.loaded.contains(&n.to_string()), "{report:?}");
    }
    assert!(report.failed.is_empty(), "{report:?}");
    let server = TestServer::start_registry(Config::for_tests(), Arc::new(reg)).await;
    let mut c = GrpcInferenceServiceClient::connect(server.url())
        .await
        .unwrap();

    let meta = c
        .model_metadata(kv::ModelMetadataRequest {
            name: "monai_unet".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.platform, "voxconv_onnx");
    assert_eq!(meta.inputs[0].name, "image");
    assert_eq!(meta.inputs[0].shape, vec![1, 1, 24, 24, 24]);
    assert_eq!(meta.outputs[0].name, "logits");
    assert_eq!(meta.outputs[0].shape, vec![1, 3, 24, 24, 24]);
    let dynamic = c
        .model_metadata(kv::ModelMetadataRequest {
            name: "monai_basicunet_dynamic".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dynamic.inputs[0].shape, vec![-1, 1, -1, -1, -1]);

    let dir = fixtures().join("monai_unet");
    let (shape, x) = npy(&dir.join("input.npy"));
    let (_, want) = npy(&dir.join("expected.npy"));
    let r = c
        .model_infer(kserve_request("monai_unet", "image", &shape, &x))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs[0].name, "logits");
    assert_eq!(r.outputs[0].shape, vec![1, 3, 24, 24, 24]);
    let got = floats(&r.raw_output_contents[0]);
    let (err, scale) = err_and_scale(&got, &want);
    assert!(err <= 1e-4 * scale, "max error {err} vs {scale}");

    let e = c
        .model_infer(kserve_request("monai_unet", "input", &shape, &x))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("expected \"image\""),
        "{}",
        e.message()
    );
    let small = vec![0f32; 16 * 16 * 16];
    let e = c
        .model_infer(kserve_request(
            "monai_unet",
            "image",
            &[1, 1, 16, 16, 16],
            &small,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("must be 24 for this model"),
        "{}",
        e.message()
    );

    let mut v1 = server.client().await;
    let info = v1
        .get_model(voxconv::proto::voxconv::v1::GetModelRequest {
            name: "monai_segresnet".into(),
            scan_shape: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.format, "onnx");
    assert_eq!(info.inputs[0].name, "image");
    assert_eq!(info.input_channels, 2);
    assert!(info.ops.contains("Conv:20"), "{}", info.ops);
    assert!(info.working_bytes > 0);

    // The CLI, as a user runs it, through voxconv.v1 (first input and output).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("y.npy");
    let dir = fixtures().join("nnunet_plainconv");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_voxconv"));
    cmd.args([
        "infer",
        "--server",
        &server.url(),
        "--model",
        "nnunet_plainconv",
        "--input",
    ])
    .arg(dir.join("input.npy"))
    .arg("--output")
    .arg(&out);
    let o = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, want) = npy(&dir.join("expected.npy"));
    let (got_shape, got) = npy(&out);
    assert_eq!(got_shape, vec![1, 3, 32, 32, 32]);
    let (err, scale) = err_and_scale(&got, &want);
    assert!(err <= 1e-4 * scale, "CLI: max error {err} vs {scale}");
}

// ---- untrusted files ----

fn model_dir(bytes: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("model.onnx"), bytes).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, "bad") {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn vi(name: &str, dims: &[i64]) -> ox::ValueInfoProto {
    use ox::tensor_shape_proto::{dimension::Value, Dimension};
    ox::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(ox::TypeProto {
            value: Some(ox::type_proto::Value::TensorType(ox::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(ox::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> ox::NodeProto {
    ox::NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn model(nodes: Vec<ox::NodeProto>, inits: Vec<ox::TensorProto>, opset: i64) -> Vec<u8> {
    ox::ModelProto {
        ir_version: Some(8),
        opset_import: vec![ox::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(ox::GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![vi("x", &[1, 1, 4, 4, 4])],
            output: vec![vi("y", &[1, 1, 4, 4, 4])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn weight(name: &str, dims: &[i64], n: usize) -> ox::TensorProto {
    ox::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: vec![0.5; n],
        ..Default::default()
    }
}

fn external(name: &str, location: &str) -> ox::TensorProto {
    ox::TensorProto {
        name: Some(name.into()),
        dims: vec![1],
        data_type: Some(1),
        data_location: Some(ox::tensor_proto::DataLocation::External as i32),
        external_data: vec![ox::StringStringEntryProto {
            key: Some("location".into()),
            value: Some(location.into()),
        }],
        ..Default::default()
    }
}

/// A valid tiny graph loads and runs (so the bad cases below fail for their own reason).
#[test]
fn a_minimal_graph_loads_and_each_bad_file_is_a_named_load_error() {
    let ok = model(
        vec![
            node("c", "Conv", &["x", "w"], &["h"]),
            node("r", "Relu", &["h"], &["y"]),
        ],
        vec![weight("w", &[1, 1, 1, 1, 1], 1)],
        17,
    );
    let d = model_dir(&ok);
    let m = load_model(d.path(), "ok").unwrap();
    let plan = m.plan([1, 1, 4, 4, 4]).unwrap();
    let x: Vec<f32> = (0..64).map(|i| i as f32 - 32.0).collect();
    let mut y = vec![f32::NAN; 64];
    plan.run_to(&m, x.clone(), 1, None, &mut y).unwrap();
    assert!(y.iter().zip(&x).all(|(a, b)| *a == (0.5 * b).max(0.0)));

    // Truncated and corrupt protobuf.
    let e = load_err(model_dir(&ok[..ok.len() / 2]).path());
    assert!(e.contains("not a valid ONNX protobuf"), "{e}");
    let e = load_err(model_dir(b"\xff\xff\xff\xff garbage").path());
    assert!(e.contains("not a valid ONNX protobuf"), "{e}");

    // Every unsupported op listed at once, with node name, op and opset.
    let e = load_err(
        model_dir(&model(
            vec![
                node("a", "Einsum", &["x"], &["h"]),
                node("b", "LSTM", &["h"], &["y"]),
            ],
            vec![],
            17,
        ))
        .path(),
    );
    assert!(e.contains("2 node(s)"), "{e}");
    assert!(
        e.contains("node \"a\" (Einsum, opset 17): op Einsum is not supported"),
        "{e}"
    );
    assert!(e.contains("node \"b\" (LSTM, opset 17)"), "{e}");

    // Grouped convolution, an opset outside 13–21, a cycle, a value nobody produces.
    let mut g = node("c", "Conv", &["x", "w"], &["y"]);
    g.attribute.push(ox::AttributeProto {
        name: Some("group".into()),
        i: Some(2),
        ..Default::default()
    });
    let e = load_err(model_dir(&model(vec![g], vec![weight("w", &[1, 1, 1, 1, 1], 1)], 17)).path());
    assert!(e.contains("group 2"), "{e}");
    let e = load_err(model_dir(&model(vec![node("r", "Relu", &["x"], &["y"])], vec![], 9)).path());
    assert!(e.contains("opset 9 is not supported"), "{e}");
    let e = load_err(
        model_dir(&model(
            vec![
                node("p", "Relu", &["q_out"], &["p_out"]),
                node("q", "Relu", &["p_out"], &["q_out"]),
                node("r", "Relu", &["x"], &["y"]),
            ],
            vec![],
            17,
        ))
        .path(),
    );
    assert!(e.contains("cycle"), "{e}");
    let e = load_err(
        model_dir(&model(
            vec![node("r", "Relu", &["nope"], &["y"])],
            vec![],
            17,
        ))
        .path(),
    );
    assert!(e.contains("reads \"nope\""), "{e}");

    // Absurd dims: an initializer claiming 2^62 elements with 1 value; dims that do not
    // match the data.
    let e = load_err(
        model_dir(&model(
            vec![node("c", "Conv", &["x", "w"], &["y"])],
            vec![weight("w", &[1 << 31, 1 << 31, 1, 1, 1], 1)],
            17,
        ))
        .path(),
    );
    assert!(e.contains("initializer \"w\""), "{e}");
    let e = load_err(
        model_dir(&model(
            vec![node("c", "Conv", &["x", "w"], &["y"])],
            vec![weight("w", &[2, 1, 3, 3, 3], 5)],
            17,
        ))
        .path(),
    );
    assert!(e.contains("need 54 values, the tensor holds 5"), "{e}");
    // A weight of the wrong shape for the input: named at load (the graph is planned for
    // its declared input).
    let e = load_err(
        model_dir(&model(
            vec![node("c", "Conv", &["x", "w"], &["y"])],
            vec![weight("w", &[1, 3, 1, 1, 1], 3)],
            17,
        ))
        .path(),
    );
    assert!(e.contains("node \"c\" (Conv)"), "{e}");

    // External data that leaves the directory: `..`, absolute, a symlink out.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("w.bin"), 0.5f32.to_le_bytes()).unwrap();
    for loc in [
        "../w.bin".to_string(),
        outside.path().join("w.bin").display().to_string(),
    ] {
        let e = load_err(
            model_dir(&model(
                vec![node("m", "Mul", &["x", "w"], &["y"])],
                vec![external("w", &loc)],
                17,
            ))
            .path(),
        );
        assert!(e.contains("must be a plain relative path"), "{loc}: {e}");
    }
    let d = model_dir(&model(
        vec![node("m", "Mul", &["x", "w"], &["y"])],
        vec![external("w", "link.bin")],
        17,
    ));
    std::os::unix::fs::symlink(outside.path().join("w.bin"), d.path().join("link.bin")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("resolves outside the model directory"), "{e}");
    // The same weight inside the directory loads, and a short file is an error.
    let d = model_dir(&model(
        vec![node("m", "Mul", &["x", "w"], &["y"])],
        vec![external("w", "w.bin")],
        17,
    ));
    std::fs::write(d.path().join("w.bin"), 0.5f32.to_le_bytes()).unwrap();
    load_model(d.path(), "ext").unwrap();
    std::fs::write(d.path().join("w.bin"), [0u8; 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("past its end"), "{e}");
}

/// A repository with a broken ONNX model beside good ones: the broken one is reported by
/// name, the others serve.
#[test]
fn a_broken_onnx_model_does_not_stop_the_others() {
    let repo = tempfile::tempdir().unwrap();
    let good = repo.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::copy(
        fixtures().join("monai_unet/model.onnx"),
        good.join("model.onnx"),
    )
    .unwrap();
    let bad = repo.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not onnx").unwrap();
    let (reg, report) = ModelRegistry::with_repository(repo.path().to_path_buf()).unwrap();
    assert_eq!(report.loaded, vec!["good".to_string()]);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].1.contains("bad"), "{:?}", report.failed);
    assert!(reg.snapshot().get("good").is_some());
}

// ---- fused activations ----

fn ints(name: &str, v: &[i64]) -> ox::AttributeProto {
    ox::AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    }
}

fn seeded_init(name: &str, dims: &[i64], seed: u64) -> ox::TensorProto {
    let n = dims.iter().product::<i64>() as usize;
    ox::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: voxconv::kernel::seeded(n, seed),
        ..Default::default()
    }
}

/// `Conv → PRelu (one slope per channel) → InstanceNormalization → Elu → Conv → PRelu (one
/// shared slope)`: each activation is fused into the step before it (no PRelu or Elu step
/// is left), and the output equals the kernel's f64 reference of the same chain computed
/// layer by layer, at 1 and 2 threads with the same bits. (The MONAI UNet fixture's PRelu
/// after every InstanceNormalization is fused the same way; `unets_match_onnxruntime`
/// checks it against onnxruntime.)
#[test]
fn prelu_and_elu_are_fused_into_convs_and_norms() {
    use voxconv::kernel::{conv3d_reference, Activation, Conv3dParams, Conv3dShape};
    let (c0, c1, c2) = (2usize, 3usize, 2usize);
    let dims = [5usize, 6, 7];
    let x_shape = [1, c0, dims[0], dims[1], dims[2]];
    let pads = ints("pads", &[1, 1, 1, 1, 1, 1]);
    let mut conv1 = node("conv1", "Conv", &["x", "w1", "b1"], &["h1"]);
    conv1.attribute.push(pads.clone());
    let mut conv2 = node("conv2", "Conv", &["h4", "w2", "b2"], &["h5"]);
    conv2.attribute.push(pads);
    let mut elu = node("elu", "Elu", &["h3"], &["h4"]);
    elu.attribute.push(ox::AttributeProto {
        name: Some("alpha".into()),
        f: Some(0.6),
        r#type: Some(1),
        ..Default::default()
    });
    let slopes1 = [0.25f32, -0.5, 0.75];
    let inits = vec![
        seeded_init("w1", &[c1 as i64, c0 as i64, 3, 3, 3], 11),
        seeded_init("b1", &[c1 as i64], 12),
        ox::TensorProto {
            name: Some("s1".into()),
            dims: vec![c1 as i64, 1, 1, 1],
            data_type: Some(1),
            float_data: slopes1.to_vec(),
            ..Default::default()
        },
        seeded_init("gamma", &[c1 as i64], 13),
        seeded_init("beta", &[c1 as i64], 14),
        seeded_init("w2", &[c2 as i64, c1 as i64, 3, 3, 3], 15),
        seeded_init("b2", &[c2 as i64], 16),
        ox::TensorProto {
            name: Some("s2".into()),
            dims: vec![1],
            data_type: Some(1),
            float_data: vec![0.1],
            ..Default::default()
        },
    ];
    let y_shape = [1, c2, dims[0], dims[1], dims[2]];
    let i64s = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let bytes = ox::ModelProto {
        ir_version: Some(8),
        opset_import: vec![ox::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(ox::GraphProto {
            node: vec![
                conv1,
                node("prelu1", "PRelu", &["h1", "s1"], &["h2"]),
                node(
                    "norm",
                    "InstanceNormalization",
                    &["h2", "gamma", "beta"],
                    &["h3"],
                ),
                elu,
                conv2,
                node("prelu2", "PRelu", &["h5", "s2"], &["y"]),
            ],
            initializer: inits.clone(),
            input: vec![vi("x", &i64s(&x_shape))],
            output: vec![vi("y", &i64s(&y_shape))],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let d = model_dir(&bytes);
    let m = load_model(d.path(), "fused").unwrap();
    let g = m.graph().expect("an ONNX graph");
    let plan = g.plan(x_shape).unwrap();
    let steps = plan.strategies();
    assert_eq!(steps.len(), 3, "conv, norm, conv: {steps:?}");
    assert!(
        steps.iter().all(|(_, s)| !["PRelu", "Elu"].contains(s)),
        "{steps:?}"
    );

    // The same chain by the reference, layer by layer.
    let init = |name: &str| {
        inits
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
            .unwrap()
            .float_data
            .clone()
    };
    let x = voxconv::kernel::seeded(x_shape.iter().product(), 17);
    let pad1 = Conv3dParams {
        padding: [1, 1, 1],
        ..Conv3dParams::default()
    };
    let s1 = Conv3dShape::new(x_shape, [c1, c0, 3, 3, 3], pad1).unwrap();
    let h2 = conv3d_reference(
        &s1,
        &x,
        &init("w1"),
        Some(&init("b1")),
        Activation::PRelu(slopes1.to_vec().into()),
    )
    .unwrap();
    let sp: usize = dims.iter().product();
    let (gamma, beta) = (init("gamma"), init("beta"));
    let mut h4 = h2.clone();
    for (c, ch) in h4.chunks_mut(sp).enumerate() {
        let n = sp as f64;
        let mean = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = ch
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        for v in ch.iter_mut() {
            let t = (f64::from(*v) - mean) / (var + 1e-5).sqrt() * f64::from(gamma[c])
                + f64::from(beta[c]);
            *v = (if t > 0.0 { t } else { 0.6 * t.exp_m1() }) as f32;
        }
    }
    let s2 = Conv3dShape::new(s1.output, [c2, c1, 3, 3, 3], pad1).unwrap();
    let want = conv3d_reference(
        &s2,
        &h4,
        &init("w2"),
        Some(&init("b2")),
        Activation::PRelu(vec![0.1].into()),
    )
    .unwrap();

    let mut outs = Vec::new();
    for threads in [1, 2] {
        let mut got = vec![f32::NAN; want.len()];
        let mp = m.plan(x_shape).unwrap();
        mp.run_to(&m, x.clone(), threads, None, &mut got).unwrap();
        let (err, scale) = err_and_scale(&got, &want);
        assert!(
            err <= 1e-4 * scale,
            "{threads} threads: max error {err} vs {scale}"
        );
        outs.push(got);
    }
    assert!(outs[0]
        .iter()
        .zip(&outs[1])
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    // A slope that is not per channel (varies along W) is not fused, and still right.
    let mut bad = inits.clone();
    bad.retain(|t| t.name.as_deref() != Some("s2"));
    bad.push(ox::TensorProto {
        name: Some("s2".into()),
        dims: vec![dims[2] as i64],
        data_type: Some(1),
        float_data: (0..dims[2]).map(|i| i as f32 * 0.1).collect(),
        ..Default::default()
    });
    let mut proto = ox::ModelProto::decode(&bytes[..]).unwrap();
    proto.graph.as_mut().unwrap().initializer = bad;
    let d = model_dir(&proto.encode_to_vec());
    let m = load_model(d.path(), "unfused").unwrap();
    let steps = m.graph().unwrap().plan(x_shape).unwrap().strategies();
    assert!(steps.iter().any(|(_, s)| *s == "PRelu"), "{steps:?}");
    let mut got = vec![f32::NAN; want.len()];
    m.plan(x_shape)
        .unwrap()
        .run_to(&m, x.clone(), 2, None, &mut got)
        .unwrap();
    let pre = conv3d_reference(&s2, &h4, &init("w2"), Some(&init("b2")), Activation::None).unwrap();
    for (i, (&g, &p)) in got.iter().zip(&pre).enumerate() {
        let slope = (i % dims[2]) as f32 * 0.1;
        let w = if p >= 0.0 { p } else { p * slope };
        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{i}: {g} vs {w}");
    }
}

/// MONAI UNet's PRelu (after each InstanceNormalization) leaves no step of its own.
#[test]
fn monai_unet_prelus_are_fused() {
    let name = "monai_unet";
    let dir = fixtures().join(name);
    let m = load_model(&dir, name).unwrap();
    let g = m.graph().expect("an ONNX graph");
    assert!(g.nodes.iter().any(|n| n.op.name() == "PRelu"));
    let (shape, _) = npy(&dir.join("input.npy"));
    let steps = g.plan(shape.try_into().unwrap()).unwrap().strategies();
    assert!(steps.iter().all(|(_, s)| *s != "PRelu"), "{steps:?}");
}

/// An InstanceNormalization reading only a convolution's output is fused into it (the
/// convolution gathers the statistics per tile; the norm and its activation are one more
/// pass): BasicUNet's and nnU-Net's Conv → InstanceNormalization → LeakyRelu leave one
/// step each, and MONAI UNet's Conv → InstanceNormalization → PRelu too, except after its
/// transposed convolutions (whose norms stay steps of their own). The outputs still match
/// onnxruntime (`unets_match_onnxruntime`).
#[test]
fn instance_norms_after_convolutions_are_fused() {
    for name in ["monai_basicunet", "nnunet_plainconv", "monai_unet"] {
        let dir = fixtures().join(name);
        let m = load_model(&dir, name).unwrap();
        let g = m.graph().expect("an ONNX graph");
        let norms = g
            .nodes
            .iter()
            .filter(|n| n.op.name() == "InstanceNormalization")
            .count();
        let transposed = g
            .nodes
            .iter()
            .filter(|n| n.op.name() == "ConvTranspose")
            .count();
        assert!(norms > 0, "{name}");
        let (shape, _) = npy(&dir.join("input.npy"));
        let steps = g.plan(shape.try_into().unwrap()).unwrap().strategies();
        let left = steps
            .iter()
            .filter(|(_, s)| *s == "InstanceNormalization")
            .count();
        assert!(
            left <= transposed,
            "{name}: {left} of {norms} norms left: {steps:?}"
        );
        for op in ["LeakyRelu", "PRelu"] {
            assert!(
                steps.iter().all(|(_, s)| *s != op),
                "{name}: {op} left: {steps:?}"
            );
        }
    }
}
