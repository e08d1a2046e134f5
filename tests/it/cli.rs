//! The `voxconv conv3d` and `voxconv kernel-bench` subcommands, run as a user would.

use std::path::Path;
use std::process::Command;

fn voxconv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_voxconv"))
}

fn golden(name: &str, part: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/golden/{name}.{part}.npy"))
}

#[test]
fn conv3d_subcommand_reproduces_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    let case = "mixed_params_relu";
    let status = voxconv()
        .args(["conv3d", "--input"])
        .arg(golden(case, "input"))
        .arg("--filters")
        .arg(golden(case, "filters"))
        .arg("--bias")
        .arg(golden(case, "bias"))
        .args([
            "--stride",
            "2,1,2",
            "--padding",
            "1,0,2",
            "--dilation",
            "1,2,1",
        ])
        .args(["--activation", "relu", "--threads", "2", "--output"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let got = voxconv::tensor::read_npy(&out).unwrap();
    let want = voxconv::tensor::read_npy(&golden(case, "expected")).unwrap();
    assert_eq!(got.shape, want.shape);
    let max_err = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_err < 1e-5, "max error {max_err}");
}

#[test]
fn conv3d_subcommand_reports_bad_shapes_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // Input of the 3-channel case with filters of the 2-channel case.
    let out = voxconv()
        .args(["conv3d", "--input"])
        .arg(golden("batch2_leaky", "input"))
        .arg("--filters")
        .arg(golden("mixed_params_relu", "filters"))
        .arg("--output")
        .arg(dir.path().join("y.npy"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("C_in = 2") && err.contains("input has 3"),
        "{err}"
    );
    assert!(!dir.path().join("y.npy").exists());

    let out = voxconv()
        .args([
            "conv3d",
            "--input",
            "x.npy",
            "--filters",
            "w.npy",
            "--output",
            "y.npy",
        ])
        .args(["--stride", "1,2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "usage error (EX_USAGE)");
    assert!(String::from_utf8_lossy(&out.stderr).contains("D,H,W"));
}

#[test]
fn kernel_bench_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let wl = dir.path().join("w.toml");
    std::fs::write(
        &wl,
        "[[workload]]\nname = \"a\"\ninput = [1, 2, 8, 8, 8]\nfilters = [4, 2, 3, 3, 3]\n\
         padding = [1, 1, 1]\n\n[[workload]]\nname = \"b\"\ninput = [2, 4, 6, 6, 6]\n\
         filters = [3, 4, 1, 1, 1]\n",
    )
    .unwrap();
    let out = voxconv()
        .args(["kernel-bench", "--workloads"])
        .arg(&wl)
        .args(["--threads", "2", "--repeat", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["name"], "a");
    assert_eq!(lines[1]["name"], "b");
    assert_eq!(lines[1]["strategy"], "pointwise-1x1x1");
    for l in &lines {
        assert_eq!(l["threads"], 2);
        assert!(l["median_ms"].as_f64().unwrap() > 0.0);
        assert!(l["gflops"].as_f64().unwrap() > 0.0);
        assert!(l["workspace_bytes"].is_u64());
    }
}

#[test]
fn shared_workload_file_parses() {
    let wl = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/workloads.toml");
    let file = voxconv::kernel::WorkloadFile::load(&wl).unwrap();
    let names: Vec<_> = file.workload.iter().map(|w| w.name.as_str()).collect();
    assert!(names.contains(&"mri-t1-first-layer"), "{names:?}");
    for w in &file.workload {
        w.shape().unwrap();
    }
}

/// `serve` validates the shared-memory directory before binding: exit 64, one line naming
/// the flag and what it got.
#[test]
fn serve_refuses_a_shared_memory_dir_that_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let out = voxconv()
        .args(["serve", "--listen", "127.0.0.1:0", "--shared-memory-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "usage error (EX_USAGE)");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--shared-memory-dir: expected a directory"),
        "{err}"
    );
}
