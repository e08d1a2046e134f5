//! Model repository: every subdirectory of a directory is a model named after it, with
//! `model.toml` (layers) and `weights.safetensors` (a PyTorch `state_dict`, F32/F16/BF16).
//!
//! Validation names the model directory, the layer index and the key. BatchNorm is folded
//! into the preceding convolution at load time; activations are fused into the layer before
//! them. A broken model never takes the server down: it is reported, the others serve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::sliding::WindowRequest;
use super::{ConvLayer, Layer, MaxPoolLayer, Model, ModelSet};
use crate::kernel::{Activation, Conv3dParams};

/// A load error: model directory, layer index and key where they apply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct LoadError {
    pub model_dir: String,
    pub layer: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl LoadError {
    fn render(&self) -> String {
        let mut s = format!("model {}", self.model_dir);
        if let Some(l) = self.layer {
            s.push_str(&format!(", layer {l}"));
        }
        if let Some(k) = &self.key {
            s.push_str(&format!(", key {k:?}"));
        }
        format!("{s}: {}", self.message)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    #[serde(default)]
    description: String,
    layers: Vec<LayerToml>,
    /// Sliding-window defaults for whole scans.
    #[serde(default)]
    sliding_window: WindowRequest,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerToml {
    op: String,
    weight: Option<String>,
    bias: Option<String>,
    running_mean: Option<String>,
    running_var: Option<String>,
    eps: Option<f64>,
    stride: Option<[usize; 3]>,
    padding: Option<[usize; 3]>,
    dilation: Option<[usize; 3]>,
    kernel: Option<[usize; 3]>,
    alpha: Option<f32>,
}

/// Reads one tensor as f32 with its shape.
fn tensor(st: &SafeTensors<'_>, key: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
    let t = st
        .tensor(key)
        .map_err(|_| "missing from weights.safetensors".to_string())?;
    let data = t.data();
    let values: Vec<f32> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("expected dtype F32, F16 or BF16, got {other:?}")),
    };
    Ok((values, t.shape().to_vec()))
}

/// Optional `model.toml` beside a `model.onnx`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnnxToml {
    #[serde(default)]
    description: String,
    /// Sliding-window defaults for whole scans.
    #[serde(default)]
    sliding_window: WindowRequest,
}

/// Loads the ONNX model in `dir` (`model.onnx`, optional `model.toml` with a description).
fn load_onnx(dir: &Path, name: &str) -> Result<Model, LoadError> {
    let err = |message: String| LoadError {
        model_dir: dir.display().to_string(),
        layer: None,
        key: None,
        message,
    };
    let spec: OnnxToml = match std::fs::read_to_string(dir.join("model.toml")) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| err(format!("model.toml (beside model.onnx): {}", e.message())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnnxToml::default(),
        Err(e) => return Err(err(format!("model.toml: {e}"))),
    };
    let graph = super::onnx::load(dir).map_err(err)?;
    // Plan once now where the graph fixes its input shape, so a graph that cannot run
    // fails at load (named), not at the first call.
    if let Some(shape) = graph.declared_input() {
        graph
            .plan(shape)
            .map_err(|e| err(format!("planning for the declared input {shape:?}: {e}")))?;
    }
    let description = if spec.description.is_empty() {
        format!(
            "ONNX graph, {} nodes ({})",
            graph.nodes.len(),
            graph.op_counts()
        )
    } else {
        spec.description
    };
    let model = Model {
        name: name.to_string(),
        description,
        layers: vec![Layer::Graph(Arc::new(graph))],
        window_defaults: spec.sliding_window,
    };
    check_window_defaults(&model).map_err(err)?;
    Ok(model)
}

/// Loads the model in `dir`, named `name`: `model.onnx` if there is one, else
/// `model.toml` + `weights.safetensors`.
pub fn load_model(dir: &Path, name: &str) -> Result<Model, LoadError> {
    if dir.join("model.onnx").exists() {
        return load_onnx(dir, name);
    }
    let model_dir = dir.display().to_string();
    let err = |layer: Option<usize>, key: Option<&str>, message: String| LoadError {
        model_dir: model_dir.clone(),
        layer,
        key: key.map(str::to_string),
        message,
    };
    let toml_text = std::fs::read_to_string(dir.join("model.toml"))
        .map_err(|e| err(None, None, format!("model.toml: {e}")))?;
    let spec: ModelToml = toml::from_str(&toml_text)
        .map_err(|e| err(None, None, format!("model.toml: {}", e.message())))?;
    let bytes = std::fs::read(dir.join("weights.safetensors"))
        .map_err(|e| err(None, None, format!("weights.safetensors: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err(None, None, format!("weights.safetensors: {e}")))?;

    let mut layers: Vec<Layer> = Vec::new();
    let mut channels: Option<usize> = None;
    for (i, l) in spec.layers.iter().enumerate() {
        let need = |key: &str, v: &Option<String>| -> Result<String, LoadError> {
            v.clone()
                .ok_or_else(|| err(Some(i), Some(key), format!("{} needs `{key}`", l.op)))
        };
        let load = |key_field: &str, key: &str, rank: usize, len0: Option<usize>| {
            let (v, shape) = tensor(&st, key).map_err(|m| err(Some(i), Some(key), m))?;
            if shape.len() != rank {
                return Err(err(
                    Some(i),
                    Some(key),
                    format!("{key_field}: expected rank {rank}, got shape {shape:?}"),
                ));
            }
            if let Some(n) = len0 {
                if shape[0] != n {
                    return Err(err(
                        Some(i),
                        Some(key),
                        format!("{key_field}: expected {n} values (channels), got shape {shape:?}"),
                    ));
                }
            }
            Ok((v, shape))
        };
        let nonzero = |key: &str, v: [usize; 3]| {
            if v.contains(&0) {
                Err(err(
                    Some(i),
                    Some(key),
                    format!("expected values >= 1, got {v:?}"),
                ))
            } else {
                Ok(v)
            }
        };
        match l.op.as_str() {
            "conv3d" => {
                let wkey = need("weight", &l.weight)?;
                let (w, ws) = load("weight", &wkey, 5, None)?;
                if let Some(c) = channels {
                    if ws[1] != c {
                        return Err(err(
                            Some(i),
                            Some(&wkey),
                            format!(
                                "expects {} input channels, the previous layer gives {c}",
                                ws[1]
                            ),
                        ));
                    }
                }
                let bias = match &l.bias {
                    Some(bkey) => Some(load("bias", bkey, 1, Some(ws[0]))?.0),
                    None => None,
                };
                let d = Conv3dParams::default();
                layers.push(Layer::Conv(ConvLayer {
                    filter_shape: [ws[0], ws[1], ws[2], ws[3], ws[4]],
                    weights: w,
                    bias,
                    params: Conv3dParams {
                        stride: nonzero("stride", l.stride.unwrap_or(d.stride))?,
                        padding: l.padding.unwrap_or(d.padding),
                        dilation: nonzero("dilation", l.dilation.unwrap_or(d.dilation))?,
                    },
                    activation: Activation::None,
                }));
                channels = Some(ws[0]);
            }
            "batchnorm3d" => {
                let Some(Layer::Conv(conv)) = layers.last_mut() else {
                    return Err(err(
                        Some(i),
                        None,
                        "batchnorm3d must follow a conv3d".into(),
                    ));
                };
                if conv.activation != Activation::None {
                    return Err(err(
                        Some(i),
                        None,
                        "batchnorm3d after an activation cannot be folded into the conv3d".into(),
                    ));
                }
                let c = conv.filter_shape[0];
                let get = |key: &str, v: &Option<String>| -> Result<Vec<f32>, LoadError> {
                    Ok(load(key, &need(key, v)?, 1, Some(c))?.0)
                };
                let (gamma, beta) = (get("weight", &l.weight)?, get("bias", &l.bias)?);
                let (mean, var) = (
                    get("running_mean", &l.running_mean)?,
                    get("running_var", &l.running_var)?,
                );
                let eps = l.eps.unwrap_or(1e-5);
                fold_batchnorm(conv, &gamma, &beta, &mean, &var, eps);
            }
            "relu" | "leaky_relu" | "sigmoid" => {
                let act = match l.op.as_str() {
                    "relu" => Activation::Relu,
                    "sigmoid" => Activation::Sigmoid,
                    _ => Activation::LeakyRelu(l.alpha.unwrap_or(0.01)),
                };
                let slot = match layers.last_mut() {
                    Some(Layer::Conv(c)) => &mut c.activation,
                    Some(Layer::MaxPool(m)) => &mut m.activation,
                    Some(Layer::Graph(_)) | None => {
                        return Err(err(
                            Some(i),
                            None,
                            format!("{} cannot be the first layer", l.op),
                        ))
                    }
                };
                if *slot != Activation::None {
                    return Err(err(
                        Some(i),
                        None,
                        format!("{} follows another activation", l.op),
                    ));
                }
                *slot = act;
            }
            "maxpool3d" => {
                let kernel = nonzero(
                    "kernel",
                    l.kernel.ok_or_else(|| {
                        err(Some(i), Some("kernel"), "maxpool3d needs `kernel`".into())
                    })?,
                )?;
                let stride = nonzero("stride", l.stride.unwrap_or(kernel))?;
                if layers.is_empty() {
                    return Err(err(
                        Some(i),
                        None,
                        "the first layer must be a conv3d".into(),
                    ));
                }
                layers.push(Layer::MaxPool(MaxPoolLayer {
                    kernel,
                    stride,
                    activation: Activation::None,
                }));
            }
            other => {
                return Err(err(
                    Some(i),
                    Some("op"),
                    format!(
                        "unknown op {other:?} (expected conv3d, batchnorm3d, relu, leaky_relu, \
                         sigmoid or maxpool3d)"
                    ),
                ))
            }
        }
    }
    if layers.is_empty() {
        return Err(err(None, None, "model.toml has no layers".into()));
    }
    let model = Model {
        name: name.to_string(),
        description: spec.description,
        layers,
        window_defaults: spec.sliding_window,
    };
    check_window_defaults(&model).map_err(|m| err(None, None, m))?;
    Ok(model)
}

/// Checks a model.toml's `[sliding_window]` values (the roi too where the model fixes its
/// window or the file gives one).
fn check_window_defaults(model: &Model) -> Result<(), String> {
    let d = &model.window_defaults;
    let roi = model
        .fixed_roi()
        .or(if d.roi.is_none() { Some([1; 3]) } else { None });
    d.resolve(roi)
        .map(|_| ())
        .map_err(|e| format!("model.toml: sliding_window.{e}"))
}

/// Folds inference-mode BatchNorm into the convolution before it:
/// `w' = w·γ/√(σ²+ε)`, `b' = (b − μ)·γ/√(σ²+ε) + β` (computed in f64).
pub fn fold_batchnorm(
    conv: &mut ConvLayer,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) {
    let c_out = conv.filter_shape[0];
    let per = conv.weights.len() / c_out;
    let mut bias = conv.bias.take().unwrap_or_else(|| vec![0.0; c_out]);
    for co in 0..c_out {
        let scale = f64::from(gamma[co]) / (f64::from(var[co]) + eps).sqrt();
        for w in &mut conv.weights[co * per..(co + 1) * per] {
            *w = (f64::from(*w) * scale) as f32;
        }
        bias[co] =
            ((f64::from(bias[co]) - f64::from(mean[co])) * scale + f64::from(beta[co])) as f32;
    }
    conv.bias = Some(bias);
}

/// Name, size and modification time of a model directory's files.
type Fingerprint = Vec<(std::ffi::OsString, u64, Option<SystemTime>)>;

/// A directory's contents as (name, size, mtime) of its files (ONNX external data
/// included): reload skips a model whose files did not change.
fn fingerprint(dir: &Path) -> Fingerprint {
    let mut fp: Fingerprint = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| {
                    let m = e.metadata().ok();
                    (
                        e.file_name(),
                        m.as_ref().map_or(0, |m| m.len()),
                        m.and_then(|m| m.modified().ok()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    fp.sort();
    fp
}

/// What a (re)load found.
#[derive(Debug, Default, Clone)]
pub struct ReloadReport {
    pub loaded: Vec<String>,
    pub unchanged: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// The served models: built-ins plus a repository, swapped atomically on reload. Calls take
/// a snapshot (`Arc`), so a reload never disturbs requests in flight.
pub struct ModelRegistry {
    current: RwLock<Arc<ModelSet>>,
    /// Bumped after every reload (health follows it).
    version: tokio::sync::watch::Sender<u64>,
    repo: Option<PathBuf>,
    /// name → (fingerprint, loaded model) of the repository's good models.
    cache: std::sync::Mutex<BTreeMap<String, (Fingerprint, Arc<Model>)>>,
}

impl ModelRegistry {
    /// A registry of `base` models only.
    pub fn fixed(base: ModelSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(base)),
            version: tokio::sync::watch::Sender::new(0),
            repo: None,
            cache: Default::default(),
        }
    }

    /// Built-in models plus the repository at `dir` (loaded now).
    pub fn with_repository(dir: PathBuf) -> Result<(Self, ReloadReport), std::io::Error> {
        std::fs::read_dir(&dir)?; // the directory itself must be readable
        let reg = Self {
            current: RwLock::new(Arc::new(ModelSet::builtin())),
            version: tokio::sync::watch::Sender::new(0),
            repo: Some(dir),
            cache: Default::default(),
        };
        let report = reg.reload();
        Ok((reg, report))
    }

    /// Changes after every reload.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn snapshot(&self) -> Arc<ModelSet> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the repository: new and changed directories are loaded, removed ones
    /// dropped; a directory that fails to load is reported and, if an earlier version
    /// loaded, that version keeps serving.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let Some(dir) = &self.repo else {
            return report;
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut set = ModelSet::builtin();
        let builtin: Vec<String> = set.iter().map(|m| m.name.clone()).collect();
        let mut seen = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map(|r| r.filter_map(Result::ok).collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if !path.is_dir() || name.starts_with('.') {
                continue;
            }
            seen.push(name.clone());
            if builtin.contains(&name) {
                let msg = format!(
                    "model {}: the name {name:?} belongs to a built-in model",
                    path.display()
                );
                set.insert_broken(&name, msg.clone());
                report.failed.push((name, msg));
                continue;
            }
            let fp = fingerprint(&path);
            if let Some((old_fp, model)) = cache.get(&name) {
                if *old_fp == fp {
                    set.insert_arc(Arc::clone(model));
                    report.unchanged.push(name);
                    continue;
                }
            }
            match load_model(&path, &name) {
                Ok(m) => {
                    let m = Arc::new(m);
                    cache.insert(name.clone(), (fp, Arc::clone(&m)));
                    set.insert_arc(m);
                    report.loaded.push(name);
                }
                Err(e) => {
                    if let Some((_, old)) = cache.get(&name) {
                        set.insert_arc(Arc::clone(old)); // keep serving the last good version
                    }
                    set.insert_broken(&name, e.to_string());
                    report.failed.push((name, e.to_string()));
                }
            }
        }
        cache.retain(|name, _| {
            let keep = seen.contains(name);
            if !keep {
                report.removed.push(name.clone());
            }
            keep
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.version.send_modify(|v| *v += 1);
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_and_bf16_weights_are_converted_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let w16: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let b16: Vec<u8> = [0.25f32, 1.5]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let st = safetensors::serialize(
            [
                (
                    "w",
                    safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 1, 1, 1, 1], &w16)
                        .unwrap(),
                ),
                (
                    "b",
                    safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &b16).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        std::fs::write(dir.path().join("weights.safetensors"), st).unwrap();
        std::fs::write(
            dir.path().join("model.toml"),
            "[[layers]]\nop = \"conv3d\"\nweight = \"w\"\nbias = \"b\"\n",
        )
        .unwrap();
        let m = load_model(dir.path(), "half").unwrap();
        let c = m.convs().next().unwrap();
        assert_eq!(c.weights, vec![0.5, -2.0]);
        assert_eq!(c.bias, Some(vec![0.25, 1.5]));
    }

    #[test]
    fn batchnorm_folding_equals_conv_then_batchnorm() {
        let mut conv = ConvLayer {
            filter_shape: [2, 1, 1, 1, 2],
            weights: vec![1.0, 2.0, -1.0, 0.5],
            bias: Some(vec![0.5, -0.25]),
            params: Conv3dParams::default(),
            activation: Activation::None,
        };
        let x = [3.0f64, -2.0];
        let (g, b, m, v, eps) = (
            [2.0f32, 0.5],
            [0.1f32, -0.3],
            [0.2f32, 1.0],
            [4.0f32, 0.25],
            1e-5,
        );
        let before: Vec<f64> = (0..2)
            .map(|co| {
                let y = f64::from(conv.weights[co * 2]) * x[0]
                    + f64::from(conv.weights[co * 2 + 1]) * x[1]
                    + f64::from(conv.bias.as_ref().unwrap()[co]);
                (y - f64::from(m[co])) / (f64::from(v[co]) + eps).sqrt() * f64::from(g[co])
                    + f64::from(b[co])
            })
            .collect();
        fold_batchnorm(&mut conv, &g, &b, &m, &v, eps);
        for (co, want) in before.iter().enumerate() {
            let y = f64::from(conv.weights[co * 2]) * x[0]
                + f64::from(conv.weights[co * 2 + 1]) * x[1]
                + f64::from(conv.bias.as_ref().unwrap()[co]);
            assert!((y - want).abs() < 1e-5, "{y} vs {want}");
        }
    }
}
