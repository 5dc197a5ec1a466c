//! `--device cuda` on a machine that cannot run it fails at once, with an error that names what
//! is missing, for every command that takes a device: built without the `cuda` feature, the
//! error says to rebuild with it; built with it (`cargo test -p meshtune-node --features cuda
//! --test cuda_guard`) on a machine without the NVIDIA driver, it names `libcuda.so.1`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Whether this machine has a CUDA driver library (then the guard lets `--device cuda` through
/// and this test has nothing to check).
fn driver_present() -> bool {
    // SAFETY: loading the driver runs its initialisers, which have no preconditions.
    cfg!(feature = "cuda") && unsafe { libloading::Library::new("libcuda.so.1") }.is_ok()
}

#[test]
fn every_device_command_names_what_cuda_lacks() {
    if driver_present() {
        eprintln!("skipped: libcuda.so.1 loads on this machine");
        return;
    }
    let synthetic = fixtures().join("synthetic");
    let data = synthetic.join("eval.jsonl");
    let model = fixtures().join("models").join("flan-odd");
    let out = tempfile::tempdir().expect("tmp");
    let out = out.path().to_str().expect("utf-8 path");
    let (model, data, synthetic) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        synthetic.to_str().expect("utf-8"),
    );
    let want = if cfg!(feature = "cuda") {
        "libcuda.so.1"
    } else {
        "--features cuda"
    };
    let commands: [&[&str]; 6] = [
        &["score", "--model", model, "--data", data],
        &["generate", "--model", model, "--data", data],
        &[
            "train", "--model", model, "--train", data, "--eval", data, "--out", out, "--steps",
            "1",
        ],
        &[
            "node",
            "--model",
            synthetic,
            "--random-init",
            "--train",
            data,
            "--out",
            out,
        ],
        &["bench", "forward", "--preset", "flan-t5-small"],
        &["bench", "train", "--preset", "flan-t5-small"],
    ];
    for args in commands {
        let output = Command::new(env!("CARGO_BIN_EXE_meshtune"))
            .args(args)
            .args(["--device", "cuda"])
            .env("MESHTUNE_LOG", "warn")
            .output()
            .expect("run meshtune");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        assert!(
            stderr.contains("--device cuda:0") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
}
