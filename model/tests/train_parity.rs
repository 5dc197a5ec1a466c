//! Training parity with PyTorch (fixtures/train_parity, made by scripts/make_train_fixture.py):
//! the same data order, torch AdamW, HF linear warm-up schedule, global-norm clipping and
//! gradient accumulation give per-step losses within 1e-3 relative over 20 steps, for full
//! fine-tuning and for LoRA; the trained weights' norms match too.

use std::path::{Path, PathBuf};

use meshtune_model::backend::CpuTrain;
use meshtune_model::lora::{LoraConfig, LoraTarget, SafetensorsLoraInit, attach_lora, merge_lora};
use meshtune_model::optim::{AdamWConfig, ScheduleKind};
use meshtune_model::precision::{LossScaler, Precision};
use meshtune_model::score::{Seq2SeqBatch, score_batch};
use meshtune_model::train::{StepConfig, TrainState};
use meshtune_model::weights::{load_model, named_weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn read_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("train_parity").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn batch_of(reference: &serde_json::Value, rows: &[usize]) -> Seq2SeqBatch {
    let examples = reference["examples"].as_array().expect("examples");
    let sources: Vec<Vec<u32>> = rows
        .iter()
        .map(|&r| ids(&examples[r]["source_ids"]))
        .collect();
    let targets: Vec<Vec<u32>> = rows
        .iter()
        .map(|&r| ids(&examples[r]["target_ids"]))
        .collect();
    Seq2SeqBatch::new(&sources, &targets, 0, 0).expect("batch")
}

fn step_config(reference: &serde_json::Value) -> StepConfig {
    let opt = &reference["optimizer"];
    let betas = opt["betas"].as_array().expect("betas");
    StepConfig {
        lr: opt["lr"].as_f64().expect("lr"),
        adamw: AdamWConfig {
            beta1: betas[0].as_f64().expect("b1"),
            beta2: betas[1].as_f64().expect("b2"),
            eps: opt["eps"].as_f64().expect("eps"),
            weight_decay: opt["weight_decay"].as_f64().expect("wd"),
        },
        schedule: ScheduleKind::Linear,
        warmup_steps: reference["schedule"]["warmup"].as_u64().expect("warmup") as usize,
        total_steps: reference["schedule"]["total"].as_u64().expect("total") as usize,
        max_grad_norm: reference["max_grad_norm"].as_f64(),
        precision: Default::default(),
        optimizer: Default::default(),
    }
}

fn run_and_compare(
    reference: &serde_json::Value,
    state: TrainState<CpuTrain>,
    label: &str,
) -> TrainState<CpuTrain> {
    run_within(reference, state, label, 1e-3, 1e-3)
}

/// Steps through the reference's batches; loss and gradient norm within `tolerance` relative.
fn run_within<B: burn::tensor::backend::AutodiffBackend>(
    reference: &serde_json::Value,
    mut state: TrainState<B>,
    label: &str,
    tolerance: f64,
    norm_tolerance: f64,
) -> TrainState<B> {
    for (i, step) in reference["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .enumerate()
    {
        let micro: Vec<Seq2SeqBatch> = step["micro_batch_rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|rows| {
                let rows: Vec<usize> = rows
                    .as_array()
                    .expect("rows")
                    .iter()
                    .map(|r| r.as_u64().expect("row") as usize)
                    .collect();
                batch_of(reference, &rows)
            })
            .collect();
        let stats = state.step(&micro).expect("step");
        let want_loss = step["loss"].as_f64().expect("loss");
        let want_norm = step["grad_norm"].as_f64().expect("norm");
        let want_lr = step["lr"].as_f64().expect("lr");
        let rel = (stats.loss - want_loss).abs() / want_loss;
        eprintln!(
            "{label} step {:>2}: loss {:.6} vs {want_loss:.6} (rel {rel:.2e}), grad norm {:.6} vs {want_norm:.6}",
            i + 1,
            stats.loss,
            stats.grad_norm
        );
        assert!(!stats.skipped, "{label} step {}: skipped", i + 1);
        assert!(
            rel <= tolerance,
            "{label} step {}: loss {} vs {want_loss}",
            i + 1,
            stats.loss
        );
        assert!(
            (stats.grad_norm - want_norm).abs() / want_norm <= norm_tolerance,
            "{label} step {}: grad norm {} vs {want_norm}",
            i + 1,
            stats.grad_norm
        );
        assert!(
            (stats.lr - want_lr).abs() <= 1e-12,
            "{label} step {}: lr {} vs {want_lr}",
            i + 1,
            stats.lr
        );
    }
    state
}

fn l2(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn full_fine_tuning_matches_pytorch_per_step() {
    let reference = read_json("full.json");
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
    let state = run_and_compare(
        &reference,
        TrainState::new(model, step_config(&reference)),
        "full",
    );

    // The weights themselves, not only the losses.
    let norms = reference["final_param_norms"].as_object().expect("norms");
    let trained = state.inference_model();
    let mut checked = 0;
    for (key, tensor) in named_weights(&trained) {
        let name = key.hf_name();
        let Some(want) = norms.get(&name).and_then(|v| v.as_f64()) else {
            continue;
        };
        let got = l2(&tensor.to_f32_vec().expect("values"));
        assert!(
            (got - want).abs() / want <= 1e-4,
            "{name}: norm {got} vs {want}"
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} tensors compared");

    // Evaluation after training, as one padded batch.
    let rows: Vec<usize> = (0..reference["examples"].as_array().expect("ex").len()).collect();
    let batch = batch_of(&reference, &rows);
    let losses = score_batch(&trained, &batch).expect("score");
    let total: f64 = losses.iter().map(|l| l.loss * l.tokens as f64).sum();
    let tokens: usize = losses.iter().map(|l| l.tokens).sum();
    let want = reference["final_eval_loss"].as_f64().expect("eval");
    let got = total / tokens as f64;
    assert!(
        (got - want).abs() / want <= 1e-3,
        "eval loss {got} vs {want}"
    );
}

#[test]
fn lora_matches_pytorch_per_step_and_merges() {
    let reference = read_json("lora.json");
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
    let lora = &reference["lora"];
    let config = LoraConfig {
        rank: lora["rank"].as_u64().expect("rank") as usize,
        alpha: lora["alpha"].as_f64().expect("alpha"),
        dropout: lora["dropout"].as_f64().expect("dropout"),
        targets: vec![LoraTarget::Q, LoraTarget::V],
    };
    let mut init = SafetensorsLoraInit::open(
        &fixtures().join("train_parity/lora_init.safetensors"),
        &device,
    )
    .expect("init");
    let model = attach_lora(model, &config, &mut init).expect("attach");
    let state = run_and_compare(
        &reference,
        TrainState::new(model, step_config(&reference)),
        "lora",
    );

    // Base weights untouched, adapters trained; merged model computes the same loss.
    let trained = state.inference_model();
    let norms = reference["final_param_norms"].as_object().expect("norms");
    for (key, tensor) in named_weights(&trained) {
        let name = key.hf_name();
        if let Some(want) = norms.get(&name).and_then(|v| v.as_f64()) {
            let got = l2(&tensor.to_f32_vec().expect("values"));
            assert!(
                (got - want).abs() / want <= 1e-5,
                "{name}: frozen norm {got} vs {want}"
            );
        }
    }
    let rows: Vec<usize> = (0..12).collect();
    let batch = batch_of(&reference, &rows);
    let adapted = score_batch(&trained, &batch).expect("score");
    let merged = merge_lora(trained);
    let merged_losses = score_batch(&merged, &batch).expect("score");
    for (a, m) in adapted.iter().zip(&merged_losses) {
        assert!(
            (a.loss - m.loss).abs() <= 1e-5,
            "merge changed loss {} -> {}",
            a.loss,
            m.loss
        );
    }
    let total: f64 = adapted.iter().map(|l| l.loss * l.tokens as f64).sum();
    let tokens: usize = adapted.iter().map(|l| l.tokens).sum();
    let want = reference["final_eval_loss"].as_f64().expect("eval");
    assert!((total / tokens as f64 - want).abs() / want <= 1e-3);
}

/// Mixed precision against the same fp32 PyTorch run: bf16 and fp16 matrix products (f32
/// master weights, AdamW state, norms, softmax and loss) track its per-step losses and
/// gradient norms within what half-precision rounding allows over 20 steps (bounds below,
/// with the measured worst case). fp16 goes through dynamic loss scaling.
#[test]
fn mixed_precision_tracks_the_fp32_reference() {
    let reference = read_json("full.json");
    let device = Default::default();
    // (precision, loss tolerance, gradient-norm tolerance). Measured 2026-12-04: bf16 worst
    // loss 2.6e-3 and norm 3.2e-2 relative; fp16 (10 more mantissa bits than bf16's 7, once
    // scaled) 1.6e-4 and 1e-3.
    for (precision, loss_tol, norm_tol) in
        [(Precision::Bf16, 1e-2, 5e-2), (Precision::F16, 1e-3, 1e-2)]
    {
        let (_, model) =
            load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
        let config = StepConfig {
            precision,
            ..step_config(&reference)
        };
        let state = TrainState::new(model, config);
        assert_eq!(state.scaler.is_some(), precision == Precision::F16);
        let state = run_within(
            &reference,
            state,
            &precision.to_string(),
            loss_tol,
            norm_tol,
        );
        if let Some(scaler) = &state.scaler {
            assert_eq!(scaler.skipped, 0, "no overflow at the default scale");
        }
    }
}

/// fp16 overflow: with a loss scale far too large the scaled gradients are infinite, the step
/// is skipped without touching the weights, the scale halves, and training resumes once it
/// fits.
#[test]
fn fp16_overflow_skips_the_step_and_backs_off_the_scale() {
    let reference = read_json("full.json");
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
    // Constant lr: the reference's warm-up starts at lr 0, which would hide the update.
    let config = StepConfig {
        precision: Precision::F16,
        schedule: ScheduleKind::Constant,
        warmup_steps: 0,
        ..step_config(&reference)
    };
    let mut state = TrainState::new(model, config);
    state.scaler = Some(LossScaler::new(2f64.powi(40)));
    let rows: Vec<usize> = (0..4).collect();
    let micro = vec![batch_of(&reference, &rows)];
    // A fingerprint of every weight's bits.
    let weights = |state: &TrainState<CpuTrain>| -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (_, t) in named_weights(&state.inference_model()) {
            for v in t.to_f32_vec().expect("values") {
                v.to_bits().hash(&mut hasher);
            }
        }
        hasher.finish()
    };
    let before = weights(&state);
    let first = state.step(&micro).expect("step");
    assert!(first.skipped, "2^40 x the loss overflows fp16 gradients");
    assert_eq!(first.loss_scale, Some(2f64.powi(40)));
    assert_eq!(state.step, 0, "a skipped step does not count");
    assert_eq!(
        weights(&state),
        before,
        "a skipped step leaves the weights alone"
    );
    let mut applied = None;
    for _ in 0..40 {
        let stats = state.step(&micro).expect("step");
        if !stats.skipped {
            applied = Some(stats);
            break;
        }
    }
    let applied = applied.expect("the scale came down to something fp16 can hold");
    let scaler = state.scaler.as_ref().expect("scaler");
    println!(
        "fp16: {} steps skipped, scale now 2^{}, loss {:.4}, grad norm {:.4}",
        scaler.skipped,
        scaler.scale.log2(),
        applied.loss,
        applied.grad_norm
    );
    assert!(scaler.skipped >= 2 && scaler.scale < 2f64.powi(40));
    assert!(applied.grad_norm.is_finite() && applied.loss.is_finite());
    assert_eq!(state.step, 1);
    assert_ne!(
        weights(&state),
        before,
        "the applied step updated the weights"
    );
}

/// Activation checkpointing recomputes element-wise activations in the backward pass instead
/// of keeping them: the same arithmetic, so the same steps as the PyTorch reference.
#[test]
fn activation_checkpointing_matches_pytorch_too() {
    use meshtune_model::backend::CpuTrainCheckpointed;
    let reference = read_json("full.json");
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrainCheckpointed>(&fixtures().join("models/flan-odd"), &device)
            .expect("model");
    run_within(
        &reference,
        TrainState::new(model, step_config(&reference)),
        "checkpointed",
        1e-3,
        1e-3,
    );
}

/// Adafactor (factored second moments, no first moment, parameter-scaled steps) against HF
/// transformers' `Adafactor` on the same 20 steps (`fixtures/train_parity/adafactor.json`).
#[test]
fn adafactor_matches_transformers_per_step() {
    use meshtune_model::optim::{AdafactorConfig, OptimizerKind};
    let reference = read_json("adafactor.json");
    let opt = &reference["optimizer"];
    assert_eq!(opt["kind"], "transformers.optimization.Adafactor");
    let eps = opt["eps"].as_array().expect("eps");
    let adafactor = AdafactorConfig {
        eps1: eps[0].as_f64().expect("eps1"),
        eps2: eps[1].as_f64().expect("eps2"),
        clip_threshold: opt["clip_threshold"].as_f64().expect("clip"),
        decay_rate: opt["decay_rate"].as_f64().expect("decay"),
        beta1: opt["beta1"].as_f64(),
        weight_decay: opt["weight_decay"].as_f64().expect("wd"),
        scale_parameter: opt["scale_parameter"].as_bool().expect("scale"),
        relative_step: opt["relative_step"].as_bool().expect("relative"),
        warmup_init: opt["warmup_init"].as_bool().expect("warmup_init"),
    };
    let config = StepConfig {
        lr: opt["lr"].as_f64().expect("lr"),
        adamw: AdamWConfig::default(),
        schedule: ScheduleKind::Linear,
        warmup_steps: reference["schedule"]["warmup"].as_u64().expect("warmup") as usize,
        total_steps: reference["schedule"]["total"].as_u64().expect("total") as usize,
        max_grad_norm: reference["max_grad_norm"].as_f64(),
        precision: Precision::F32,
        optimizer: OptimizerKind::Adafactor(adafactor),
    };
    let device = Default::default();
    let (_, model) =
        load_model::<CpuTrain>(&fixtures().join("models/flan-odd"), &device).expect("model");
    let state = run_and_compare(&reference, TrainState::new(model, config), "adafactor");
    // The weights, not only the losses.
    let norms = reference["final_param_norms"].as_object().expect("norms");
    let mut checked = 0;
    for (key, tensor) in named_weights(&state.inference_model()) {
        let name = key.hf_name();
        let Some(want) = norms.get(&name).and_then(|v| v.as_f64()) else {
            continue;
        };
        let got = l2(&tensor.to_f32_vec().expect("values"));
        assert!(
            (got - want).abs() / want <= 1e-4,
            "{name}: norm {got} vs {want}"
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} tensors compared");
    // No first moment, factored second moments: far less state than AdamW's two per weight.
    let state_floats: usize = state
        .optimizer
        .state
        .values()
        .map(|m| m.exp_avg.dims()[0] + m.exp_avg_sq.dims()[0])
        .sum();
    let params: usize = named_weights(&state.inference_model())
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>())
        .sum();
    println!("adafactor state: {state_floats} floats for {params} parameters");
    assert!(state_floats * 10 < params, "{state_floats} vs {params}");
}
