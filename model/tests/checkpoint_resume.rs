//! Checkpoints resume exactly: training 6 steps straight gives the same losses as 3 steps,
//! checkpoint, fresh process state, restore, 3 more steps. A half-written checkpoint (left by a
//! crash) never replaces the last complete one.

use std::path::{Path, PathBuf};

use meshtune_model::backend::CpuTrain;
use meshtune_model::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint};
use meshtune_model::lora::{LoraConfig, PeftInit, attach_lora};
use meshtune_model::optim::{AdafactorConfig, AdamWConfig, OptimizerKind, ScheduleKind};
use meshtune_model::score::Seq2SeqBatch;
use meshtune_model::t5::T5;
use meshtune_model::train::{StepConfig, TrainState};
use meshtune_model::weights::load_model;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn batches() -> Vec<Vec<Seq2SeqBatch>> {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train_parity/full.json")).expect("fixture"),
    )
    .expect("json");
    let examples = reference["examples"].as_array().expect("examples").clone();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    (0..6)
        .map(|step| {
            (0..2)
                .map(|m| {
                    let rows = [(step * 2 + m) % 12, (step * 2 + m + 5) % 12];
                    let sources: Vec<_> = rows
                        .iter()
                        .map(|&r| ids(&examples[r]["source_ids"]))
                        .collect();
                    let targets: Vec<_> = rows
                        .iter()
                        .map(|&r| ids(&examples[r]["target_ids"]))
                        .collect();
                    Seq2SeqBatch::new(&sources, &targets, 0, 0).expect("batch")
                })
                .collect()
        })
        .collect()
}

fn config(optimizer: OptimizerKind) -> StepConfig {
    StepConfig {
        lr: 3e-3,
        adamw: AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        total_steps: 6,
        max_grad_norm: Some(0.5),
        precision: Default::default(),
        optimizer,
    }
}

fn base(lora: bool) -> T5<CpuTrain> {
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
    if lora {
        let config = LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..LoraConfig::default()
        };
        // Same adapter initialisation in every run.
        <CpuTrain as burn::tensor::backend::Backend>::seed(&device, 7);
        let model =
            attach_lora(model, &config, &mut PeftInit::<CpuTrain> { device }).expect("lora");
        return model;
    }
    model
}

fn check_resume(lora: bool) {
    check_resume_with(lora, OptimizerKind::AdamW);
}

fn check_resume_with(lora: bool, optimizer: OptimizerKind) {
    let data = batches();
    let mut straight = TrainState::new(base(lora), config(optimizer));
    let want: Vec<f64> = data
        .iter()
        .map(|b| straight.step(b).expect("step").loss)
        .collect();

    let dir = tempfile::tempdir().expect("tmp");
    let mut first = TrainState::new(base(lora), config(optimizer));
    for b in &data[..3] {
        first.step(b).expect("step");
    }
    save_checkpoint(
        dir.path(),
        first.step,
        &first.model,
        &first.optimizer,
        &serde_json::json!({"epoch": 0}),
        2,
    )
    .expect("save");
    drop(first);

    // A crash while writing the next checkpoint leaves only a temporary directory behind.
    std::fs::create_dir_all(dir.path().join(".checkpoint-00000004.tmp-999")).expect("tmp dir");
    std::fs::write(
        dir.path()
            .join(".checkpoint-00000004.tmp-999/params.safetensors"),
        b"garbage",
    )
    .expect("w");

    let latest = latest_checkpoint(dir.path())
        .expect("pointer")
        .expect("exists");
    assert!(
        latest.ends_with("checkpoint-00000003"),
        "{}",
        latest.display()
    );
    let mut resumed = TrainState::new(base(lora), config(optimizer));
    let (model, state) = load_checkpoint(
        &latest,
        resumed.model,
        &mut resumed.optimizer,
        &Default::default(),
    )
    .expect("load");
    resumed.model = model;
    resumed.step = state["step"].as_u64().expect("step") as usize;
    assert_eq!(state["epoch"], 0);
    let got: Vec<f64> = data[3..]
        .iter()
        .map(|b| resumed.step(b).expect("step").loss)
        .collect();
    for (g, w) in got.iter().zip(&want[3..]) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs(),
            "lora={lora}: resumed {got:?} vs straight {:?}",
            &want[3..]
        );
    }
    // Training did something.
    assert!((want[5] - want[0]).abs() > 1e-3, "{want:?}");
}

#[test]
fn full_training_resumes_exactly() {
    check_resume(false);
}

#[test]
fn lora_training_resumes_exactly() {
    check_resume(true);
}

/// Adafactor's factored moments (row and column statistics, no first moment) go through the
/// checkpoint too.
#[test]
fn adafactor_training_resumes_exactly() {
    check_resume_with(false, OptimizerKind::Adafactor(AdafactorConfig::default()));
    check_resume_with(
        false,
        OptimizerKind::Adafactor(AdafactorConfig {
            beta1: Some(0.9),
            weight_decay: 0.01,
            ..AdafactorConfig::default()
        }),
    );
}

#[test]
fn corrupt_checkpoint_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let ckpt = dir.path().join("checkpoint-00000001");
    std::fs::create_dir_all(&ckpt).expect("dir");
    std::fs::write(ckpt.join("params.safetensors"), b"not safetensors").expect("w");
    let mut state = TrainState::new(base(false), config(OptimizerKind::AdamW));
    let err = load_checkpoint(
        &ckpt,
        state.model,
        &mut state.optimizer,
        &Default::default(),
    )
    .expect_err("corrupt");
    assert!(err.to_string().contains("params.safetensors"), "{err}");
    std::fs::write(dir.path().join("latest"), "../../etc").expect("w");
    assert!(latest_checkpoint(dir.path()).is_err());
}
