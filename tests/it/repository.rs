//! Model repository: a model exported from PyTorch served end to end, load errors, reload
//! under load.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use voxconv::config::Config;
use voxconv::model::repo::ModelRegistry;
use voxconv::proto::voxconv::v1 as pb;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

async fn stream(
    c: &mut voxconv::proto::voxconv::v1::inference_client::InferenceClient<
        tonic::transport::Channel,
    >,
    model: &str,
    shape: &[u64],
    x: &[f32],
) -> Result<Vec<f32>, tonic::Status> {
    let mut reqs = vec![header(model, shape, pb::DType::Fp32, 0)];
    reqs.extend(chunks(&f32_bytes(x), 1000));
    let mut s = c.infer_stream(tokio_stream::iter(reqs)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        match m.msg.unwrap() {
            pb::infer_stream_response::Msg::Header(h) => {
                out = vec![f32::NAN; h.shape.iter().product::<u64>() as usize]
            }
            pb::infer_stream_response::Msg::Chunk(ch) => {
                let at = ch.offset as usize / 4;
                out[at..at + ch.data.len() / 4].copy_from_slice(&floats(&ch.data));
            }
            pb::infer_stream_response::Msg::Summary(_)
            | pb::infer_stream_response::Msg::Progress(_) => {}
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pytorch_fixture_model_matches_pytorch() {
    let (reg, report) = ModelRegistry::with_repository(fixtures().join("models")).unwrap();
    assert_eq!(report.loaded, vec!["tiny_net".to_string()], "{report:?}");
    let server = TestServer::start_registry(Config::for_tests(), Arc::new(reg)).await;
    let mut c = server.client().await;
    let x = voxconv::tensor::read_npy(&fixtures().join("tiny_net_io/input.npy")).unwrap();
    let want = voxconv::tensor::read_npy(&fixtures().join("tiny_net_io/expected.npy")).unwrap();
    let shape: Vec<u64> = x.shape.iter().map(|&d| d as u64).collect();
    let got = stream(&mut c, "tiny_net", &shape, &x.data).await.unwrap();
    assert_eq!(got.len(), want.data.len());
    for (i, (g, e)) in got.iter().zip(&want.data).enumerate() {
        assert!(
            (g - e).abs() <= 1e-4 * e.abs() + 1e-6,
            "element {i}: {g} vs PyTorch {e}"
        );
    }
    let info = c
        .get_model(pb::GetModelRequest {
            name: "tiny_net".into(),
            scan_shape: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ops: Vec<&str> = info.layers.iter().map(|l| l.op.as_str()).collect();
    assert_eq!(
        ops,
        ["conv3d", "maxpool3d", "conv3d"],
        "batchnorm folded, activations fused"
    );
    assert_eq!(info.layers[0].activation, "relu");
    assert!(info.layers[0].bias);
    assert_eq!((info.input_channels, info.output_channels), (1, 3));
    // conv 3 → pool 2 (jump 2) → dilated conv 3/3/5 wide: rf = 1 + 2 + 1 + 2·(2, 2, 4).
    assert_eq!(info.receptive_field, vec![8, 8, 12]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_models_are_reported_and_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixtures().join("models/tiny_net");
    copy_dir(&good, &dir.path().join("good"));
    let toml = std::fs::read_to_string(good.join("model.toml")).unwrap();
    let broken = |name: &str, model_toml: &str| {
        copy_dir(&good, &dir.path().join(name));
        std::fs::write(dir.path().join(name).join("model.toml"), model_toml).unwrap();
    };
    broken("missing_key", &toml.replace("\"4.weight\"", "\"4.nope\""));
    broken(
        "wrong_rank",
        &toml.replace("bias = \"4.bias\"", "bias = \"4.weight\""),
    );
    broken(
        "channels",
        &toml.replace("weight = \"4.weight\"", "weight = \"0.weight\""),
    );
    broken(
        "unknown_op",
        &toml.replace("op = \"relu\"", "op = \"gelu\""),
    );
    broken("bad_toml", "layers = [");
    std::fs::create_dir_all(dir.path().join("no_files")).unwrap();

    let (reg, report) = ModelRegistry::with_repository(dir.path().to_path_buf()).unwrap();
    assert_eq!(report.loaded, vec!["good".to_string()]);
    let errors: std::collections::BTreeMap<_, _> = report.failed.iter().cloned().collect();
    let expect = |name: &str, words: &[&str]| {
        let e = &errors[name];
        assert!(e.contains(name), "{e}");
        for w in words {
            assert!(e.contains(w), "{w:?} not in {e:?}");
        }
    };
    expect("missing_key", &["layer 4", "\"4.nope\"", "missing"]);
    expect("wrong_rank", &["layer 4", "\"4.weight\"", "rank 1"]);
    expect("channels", &["layer 4", "\"0.weight\"", "input channels"]);
    expect("unknown_op", &["layer 2", "\"gelu\""]);
    expect("bad_toml", &["model.toml"]);
    expect("no_files", &["model.toml"]);

    let server = TestServer::start_registry(Config::for_tests(), Arc::new(reg)).await;
    let mut c = server.client().await;
    let list = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let by_name: std::collections::BTreeMap<_, _> =
        list.models.iter().map(|m| (m.name.as_str(), m)).collect();
    assert!(by_name["good"].ready && by_name["good"].error.is_empty());
    assert!(by_name["sobel3d"].ready);
    for b in [
        "missing_key",
        "wrong_rank",
        "channels",
        "unknown_op",
        "bad_toml",
        "no_files",
    ] {
        assert!(!by_name[b].ready, "{b}");
        assert!(by_name[b].error.contains(b), "{b}: {}", by_name[b].error);
    }
    let e = c
        .get_model(pb::GetModelRequest {
            name: "channels".into(),
            scan_shape: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    let x = vec![0.5f32; 8 * 8 * 8];
    stream(&mut c, "good", &[1, 1, 8, 8, 8], &x).await.unwrap();
}

/// Writes a one-layer model (1 → 1 channel, 1×1×1 kernel of weight `w`) into `dir/name`.
fn write_scale_model(dir: &Path, name: &str, w: f32) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let data = w.to_le_bytes();
    let st = safetensors::serialize(
        [(
            "0.weight",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![1, 1, 1, 1, 1],
                &data,
            )
            .unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(d.join("weights.safetensors"), st).unwrap();
    std::fs::write(
        d.join("model.toml"),
        format!("description = \"scale by {w}\"\n\n[[layers]]\nop = \"conv3d\"\nweight = \"0.weight\"\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_models_under_load_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    write_scale_model(dir.path(), "scale", 2.0);
    write_scale_model(dir.path(), "stable", 3.0);
    let (reg, _) = ModelRegistry::with_repository(dir.path().to_path_buf()).unwrap();
    let reg = Arc::new(reg);
    let server = TestServer::start_registry(Config::for_tests(), Arc::clone(&reg)).await;
    let x = vec![1.0f32; 6 * 6 * 6];

    // Load: clients hammer `stable`, `scale` and a built-in while the repository changes.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for model in ["stable", "scale", "sobel3d"] {
        let (stop, done, x) = (Arc::clone(&stop), Arc::clone(&done), x.clone());
        let mut c = server.client().await;
        load.push(tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                let y = stream(&mut c, model, &[1, 1, 6, 6, 6], &x)
                    .await
                    .expect("no request may fail");
                seen.insert(y[0].to_bits());
                done.fetch_add(1, Ordering::SeqCst);
            }
            seen
        }));
    }
    wait_for("some load", Duration::from_secs(10), || {
        done.load(Ordering::SeqCst) > 20
    })
    .await;

    // Add one model, change another, reload while requests run.
    write_scale_model(dir.path(), "added", 5.0);
    std::fs::remove_file(dir.path().join("scale/weights.safetensors")).unwrap();
    write_scale_model(dir.path(), "scale", 7.0);
    let r = Arc::clone(&reg);
    let report = tokio::task::spawn_blocking(move || r.reload())
        .await
        .unwrap();
    assert_eq!(
        report.loaded,
        vec!["added".to_string(), "scale".to_string()],
        "{report:?}"
    );
    assert_eq!(report.unchanged, vec!["stable".to_string()]);
    let before = done.load(Ordering::SeqCst);
    wait_for("load after the reload", Duration::from_secs(10), || {
        done.load(Ordering::SeqCst) > before + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for h in load {
        seen.push(h.await.unwrap());
    }
    // `scale` answered with the old weights before the reload and the new ones after.
    assert!(
        seen[1].contains(&2.0f32.to_bits()) && seen[1].contains(&7.0f32.to_bits()),
        "{:?}",
        seen[1]
    );
    assert_eq!(seen[0].len(), 1, "stable never changed");

    let mut c = server.client().await;
    assert_eq!(
        stream(&mut c, "added", &[1, 1, 6, 6, 6], &x).await.unwrap()[0],
        5.0
    );
    // Remove a model: gone after the reload.
    std::fs::remove_dir_all(dir.path().join("added")).unwrap();
    let r = Arc::clone(&reg);
    let report = tokio::task::spawn_blocking(move || r.reload())
        .await
        .unwrap();
    assert_eq!(report.removed, vec!["added".to_string()]);
    let e = stream(&mut c, "added", &[1, 1, 6, 6, 6], &x)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}
