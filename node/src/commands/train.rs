//! `meshtune train`: local fine-tuning (full or LoRA) with PyTorch-matched AdamW, warm-up +
//! linear/cosine decay, global-norm clipping, gradient accumulation, length-bucketed dynamic
//! padding with deterministic shuffling, atomic resumable checkpoints, progress, CSV + SVG
//! curves, periodic evaluation (loss and ROUGE) and a final HF export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use meshtune_model::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint};
use meshtune_model::data::load_samsum;
use meshtune_model::flops::{device_peak, mfu, train_flops_per_step, training_memory};
use meshtune_model::lora::{PeftInit, attach_lora, merge_lora};
use meshtune_model::precision::PrecisionChoice;
use meshtune_model::score::Seq2SeqBatch;
use meshtune_model::t5::T5;
use meshtune_model::train::TrainState;
use meshtune_model::weights::{ExportDtype, export_hf_folder};
use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;
use crate::plot::{Series, write_line_chart};
use crate::trainer::TrainConfig;
use crate::trainer::data::{epoch_batches, to_batch, tokenize};
use crate::trainer::eval::evaluate;
use crate::trainer::model::{initial_model, model_config_and_tokenizer};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// HF T5 folder to fine-tune (config.json, weights, tokenizer.json).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// flan-t5-small|base|large|xl with random weights (needs --tokenizer).
    #[arg(long)]
    pub preset: Option<String>,
    /// Start from random weights with MODEL/config.json (e.g. the bundled tiny config).
    #[arg(long)]
    pub random_init: bool,
    /// tokenizer.json (default: MODEL/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub train: PathBuf,
    #[arg(long)]
    pub eval: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file with [`TrainConfig`] fields; flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train LoRA adapters (rank/alpha/targets from the config file) instead of all weights.
    #[arg(long)]
    pub lora: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Compute precision: auto (from the device), f32, bf16 or fp16 (with dynamic loss
    /// scaling); overrides the config file.
    #[arg(long)]
    pub precision: Option<PrecisionChoice>,
    /// Recompute element-wise activations in the backward pass (less memory, a little slower).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Refuse to start when the estimated peak memory exceeds this many GiB
    /// (default: MemAvailable of this machine for cpu).
    #[arg(long)]
    pub memory_budget_gib: Option<f64>,
    /// Peak TFLOP/s for MFU, or use --device-peak NAME from the built-in table.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// jetson-agx-orin-64gb, jetson-agx-orin-32gb, jetson-orin-nx-16gb, a100-sxm, h100-sxm, h200-sxm.
    #[arg(long)]
    pub device_peak: Option<String>,
}

/// One row of metrics.csv.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetricRow {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// Non-padding tokens (source + target) per second, as PyTorch scripts count them.
    tokens_per_s: f64,
    /// Tokens of the padded shapes (batch x (source_len + target_len)) per second.
    #[serde(default)]
    padded_tokens_per_s: f64,
    eval_loss: Option<f64>,
    rouge1: Option<f64>,
    rouge2: Option<f64>,
    rouge_l: Option<f64>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    match (args.device, config.activation_checkpointing) {
        (DeviceChoice::Cpu, false) => {
            train_on::<meshtune_model::backend::CpuTrain>(Default::default(), &args, config)
        }
        (DeviceChoice::Cpu, true) => train_on::<meshtune_model::backend::CpuTrainCheckpointed>(
            Default::default(),
            &args,
            config,
        ),
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), false) => train_on::<meshtune_model::backend::CudaTrain>(
            burn::backend::cuda::CudaDevice::new(index),
            &args,
            config,
        ),
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), true) => {
            train_on::<meshtune_model::backend::CudaTrainCheckpointed>(
                burn::backend::cuda::CudaDevice::new(index),
                &args,
                config,
            )
        }
        #[cfg(not(feature = "cuda"))]
        (DeviceChoice::Cuda(_), _) => anyhow::bail!(
            "this meshtune was built without CUDA: rebuild with `cargo build --release --features cuda`"
        ),
    }
}

fn load_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    if let Some(v) = args.steps {
        config.steps = v;
    }
    if let Some(v) = args.batch_size {
        config.batch_size = v;
    }
    if let Some(v) = args.lr {
        config.lr = v;
    }
    if let Some(v) = args.seed {
        config.seed = v;
    }
    if let Some(v) = args.precision {
        config.precision = v;
    }
    if args.activation_checkpointing {
        config.activation_checkpointing = true;
    }
    config.resolve_precision(args.device);
    config.validate()?;
    Ok(config)
}

pub fn mem_available_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn train_on<B: AutodiffBackend>(
    device: B::Device,
    args: &TrainArgs,
    config: TrainConfig,
) -> anyhow::Result<()> {
    let (model_config, tokenizer) = model_config_and_tokenizer(
        args.model.as_deref(),
        args.preset.as_deref(),
        args.tokenizer.as_deref(),
    )?;
    let train_records = load_samsum(&args.train)?;
    let eval_records = load_samsum(&args.eval)?;
    let train = tokenize(&train_records, &tokenizer, &config)?;
    let eval = tokenize(&eval_records, &tokenizer, &config)?;
    // Memory check before anything big is allocated.
    check_memory(args, &config, &model_config, &train)?;
    let mut model: T5<B> = initial_model(
        &model_config,
        args.model.as_deref(),
        args.random_init,
        config.seed,
        &device,
    )?;
    if args.lora {
        model = attach_lora(
            model,
            &config.lora,
            &mut PeftInit::<B> {
                device: device.clone(),
            },
        )?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut run = Run {
        state: TrainState::new(model, config.step_config()),
        device,
        checkpoints: args.out.join("checkpoints"),
        epoch: 0,
        position: 0,
        batches: Vec::new(),
        rows: Vec::new(),
        bar: ProgressBar::hidden(),
        peak: args.peak_tflops.or_else(|| {
            args.device_peak
                .as_deref()
                .and_then(device_peak)
                .map(|p| p.fp32)
        }),
        data: RunData {
            args,
            config: &config,
            model_config: &model_config,
            tokenizer: &tokenizer,
            train: &train,
            eval: &eval,
            eval_records: &eval_records,
        },
    };
    run.resume()?;
    std::fs::write(
        args.out.join("train_config.toml"),
        toml::to_string_pretty(&config)?,
    )?;
    run.rows = kept_metrics(&args.out, run.state.step)?;
    run.bar = progress_bar(config.steps, run.state.step);
    if run.state.step == 0 {
        run.initial_eval()?;
    }
    run.batches = epoch_batches(&train, config.batch_size, config.seed, run.epoch);
    while run.state.step < config.steps {
        run.step()?;
    }
    run.bar.finish_and_clear();
    run.finish()
}

/// Refuses a run whose estimated peak memory exceeds the budget (`--memory-budget-gib`, or
/// the memory available now).
fn check_memory(
    args: &TrainArgs,
    config: &TrainConfig,
    model_config: &meshtune_model::config::T5Config,
    train: &[crate::trainer::data::TokenizedExample],
) -> anyhow::Result<()> {
    let total_params = model_config.num_parameters().total();
    let trainable_estimate = if args.lora {
        crate::commands::model_info::lora_trainable_estimate(model_config, &config.lora)
    } else {
        total_params
    };
    let longest_source = train.iter().map(|e| e.source.len()).max().unwrap_or(1);
    let longest_target = train.iter().map(|e| e.target.len()).max().unwrap_or(1);
    let estimate = training_memory(
        model_config,
        config.batch_size,
        longest_source,
        longest_target,
        trainable_estimate,
        4.0,
    );
    let gib = estimate.total() / (1024f64.powi(3));
    let budget = args.memory_budget_gib.or_else(mem_available_gib);
    tracing::info!(
        parameters = total_params,
        trainable = trainable_estimate,
        estimated_peak_gib = gib,
        budget_gib = budget,
        "memory estimate"
    );
    if let Some(budget) = budget
        && gib > budget
    {
        anyhow::bail!(
            "estimated peak memory {gib:.1} GiB (weights {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1}) exceeds the budget of {budget:.1} GiB: use --lora, a smaller --batch-size or shorter max lengths",
            estimate.weights / 1024f64.powi(3),
            estimate.gradients / 1024f64.powi(3),
            estimate.optimizer / 1024f64.powi(3),
            estimate.activations / 1024f64.powi(3)
        );
    }
    Ok(())
}

/// The rows of `OUT/metrics.jsonl` up to `step`: rows written after the checkpoint a run
/// resumed from (a crash between the two) are dropped, keeping one row per step, and the file
/// is rewritten so later resumes see no duplicates.
fn kept_metrics(out: &Path, step: usize) -> anyhow::Result<Vec<MetricRow>> {
    let mut rows: Vec<MetricRow> = read_existing_metrics(&out.join("metrics.jsonl"));
    rows.retain(|r| r.step <= step);
    rows.dedup_by_key(|r| r.step);
    let mut kept = String::new();
    for row in &rows {
        kept.push_str(&serde_json::to_string(row)?);
        kept.push('\n');
    }
    std::fs::write(out.join("metrics.jsonl"), kept)?;
    Ok(rows)
}

fn progress_bar(steps: usize, step: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(step as u64);
    bar
}

/// What a run reads and never changes.
struct RunData<'a> {
    args: &'a TrainArgs,
    config: &'a TrainConfig,
    model_config: &'a meshtune_model::config::T5Config,
    tokenizer: &'a meshtune_model::tokenizer::T5Tokenizer,
    train: &'a [crate::trainer::data::TokenizedExample],
    eval: &'a [crate::trainer::data::TokenizedExample],
    eval_records: &'a [meshtune_model::data::SamsumRecord],
}

/// A training run in progress: the model and optimizer, the data position, the metrics.
struct Run<'a, B: AutodiffBackend> {
    data: RunData<'a>,
    state: TrainState<B>,
    device: B::Device,
    checkpoints: std::path::PathBuf,
    epoch: u64,
    position: usize,
    batches: Vec<Vec<usize>>,
    rows: Vec<MetricRow>,
    bar: ProgressBar,
    /// Peak TFLOP/s for MFU, when known.
    peak: Option<f64>,
}

impl<B: AutodiffBackend> Run<'_, B> {
    /// Resumes from the newest checkpoint, if any.
    fn resume(&mut self) -> anyhow::Result<()> {
        let Some(latest) = latest_checkpoint(&self.checkpoints)? else {
            return Ok(());
        };
        let state = &mut self.state;
        let model = state.model.clone();
        let (restored, saved) = load_checkpoint(&latest, model, &mut state.optimizer, &self.device)
            .with_context(|| format!("resuming from {}", latest.display()))?;
        state.model = restored;
        state.step = saved["step"].as_u64().unwrap_or(0) as usize;
        self.epoch = saved["epoch"].as_u64().unwrap_or(0);
        self.position = saved["position"].as_u64().unwrap_or(0) as usize;
        tracing::info!(checkpoint = %latest.display(), step = state.step, epoch = self.epoch, position = self.position, "resumed");
        Ok(())
    }

    /// Eval loss and ROUGE of the current model.
    fn evaluate(&self) -> anyhow::Result<(f64, (f64, f64, f64))> {
        let d = &self.data;
        Ok(evaluate(
            &self.state.model.valid(),
            d.model_config,
            d.tokenizer,
            d.eval,
            d.eval_records,
            d.config,
        )?)
    }

    /// The starting point of the curves: eval before any update.
    fn initial_eval(&self) -> anyhow::Result<()> {
        let (eval_loss, rouge) = self.evaluate()?;
        tracing::info!(
            step = 0,
            eval_loss,
            rouge_l = rouge.2,
            "eval before training"
        );
        std::fs::write(
            self.data.args.out.join("initial_eval.json"),
            serde_json::json!({"eval_loss": eval_loss, "rouge1": rouge.0, "rouge2": rouge.1, "rougeL": rouge.2})
                .to_string(),
        )?;
        Ok(())
    }

    /// The next `grad_accum` batches (a new epoch's order when one ends), with their padded
    /// and non-padding token counts.
    fn next_micro_batches(&mut self) -> anyhow::Result<(Vec<Seq2SeqBatch>, usize, usize)> {
        let config = self.data.config;
        let mut micro = Vec::with_capacity(config.grad_accum);
        let (mut shape_tokens, mut real_tokens) = (0usize, 0usize);
        for _ in 0..config.grad_accum {
            if self.position >= self.batches.len() {
                self.epoch += 1;
                self.position = 0;
                self.batches =
                    epoch_batches(self.data.train, config.batch_size, config.seed, self.epoch);
            }
            let batch = to_batch(
                self.data.train,
                &self.batches[self.position],
                self.data.model_config,
            )?;
            shape_tokens += batch.batch * (batch.source_len + batch.target_len);
            real_tokens +=
                batch.attention_mask.iter().filter(|&&m| m != 0).count() + batch.target_tokens();
            micro.push(batch);
            self.position += 1;
        }
        Ok((micro, shape_tokens, real_tokens))
    }

    /// One optimizer step, its metrics row, and the eval and checkpoint when due.
    fn step(&mut self) -> anyhow::Result<()> {
        let config = self.data.config;
        let (micro, shape_tokens, real_tokens) = self.next_micro_batches()?;
        // Dropout (when enabled) draws from the backend generator: reseeding per step makes a
        // resumed run repeat the same masks.
        B::seed(
            &self.device,
            config.seed.wrapping_add(self.state.step as u64),
        );
        let started = Instant::now();
        let stats = match self.state.step(&micro) {
            Ok(stats) => stats,
            Err(err) => {
                self.bar.abandon();
                let last = latest_checkpoint(&self.checkpoints)?;
                anyhow::bail!(
                    "{err}; the last good checkpoint is {}",
                    last.map_or("none (no step completed yet)".into(), |p| p
                        .display()
                        .to_string())
                );
            }
        };
        if stats.skipped {
            self.bar.suspend(|| {
                tracing::warn!(
                    step = stats.step + 1,
                    loss_scale = stats.loss_scale,
                    "fp16 gradients overflowed: step skipped, loss scale halved"
                );
            });
            return Ok(());
        }
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_s = real_tokens as f64 / seconds;
        let flops = micro
            .iter()
            .map(|b| {
                train_flops_per_step(self.data.model_config, b.batch, b.source_len, b.target_len)
            })
            .sum::<f64>();
        let step_mfu = self.peak.map(|p| mfu(flops, seconds, p));
        let mut row = MetricRow {
            step: stats.step + 1,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s,
            padded_tokens_per_s: shape_tokens as f64 / seconds,
            eval_loss: None,
            rouge1: None,
            rouge2: None,
            rouge_l: None,
        };
        self.bar.set_position(self.state.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s{}",
            stats.loss,
            stats.lr,
            tokens_per_s,
            step_mfu.map_or(String::new(), |m| format!(" MFU {:.1}%", m * 100.0))
        ));
        tracing::debug!(
            step = row.step,
            loss = stats.loss,
            grad_norm = stats.grad_norm,
            lr = stats.lr,
            tokens_per_s,
            "step"
        );
        let last_step = self.state.step == config.steps;
        if self.state.step.is_multiple_of(config.eval_every) || last_step {
            let (eval_loss, rouge) = self.evaluate()?;
            (row.eval_loss, row.rouge1, row.rouge2, row.rouge_l) =
                (Some(eval_loss), Some(rouge.0), Some(rouge.1), Some(rouge.2));
            self.bar.suspend(|| {
                tracing::info!(
                    step = row.step,
                    train_loss = stats.loss,
                    eval_loss,
                    rouge_l = rouge.2,
                    "eval"
                );
            });
        }
        append_metric(&self.data.args.out.join("metrics.jsonl"), &row)?;
        self.rows.push(row);
        if self.state.step.is_multiple_of(config.checkpoint_every) || last_step {
            save_checkpoint(
                &self.checkpoints,
                self.state.step,
                &self.state.model,
                &self.state.optimizer,
                &serde_json::json!({"epoch": self.epoch, "position": self.position, "seed": config.seed}),
                config.keep_checkpoints,
            )?;
        }
        Ok(())
    }

    /// Curves, the final HF export (adapters merged), and the closing line.
    fn finish(self) -> anyhow::Result<()> {
        let (args, config) = (self.data.args, self.data.config);
        write_reports(&args.out, &self.rows)?;
        let final_model = self.state.model.valid();
        let final_model = if args.lora {
            merge_lora(final_model)
        } else {
            final_model
        };
        export_hf_folder(
            &final_model,
            self.data.model_config,
            Some(self.data.tokenizer.path()),
            &args.out.join("final"),
            ExportDtype::F32,
        )?;
        let last = self.rows.iter().rev().find(|r| r.rouge_l.is_some());
        println!(
            "trained {} steps; final eval loss {:.4}, ROUGE-L {:.4}; model in {}, curves in {}",
            config.steps,
            last.and_then(|r| r.eval_loss).unwrap_or(f64::NAN),
            last.and_then(|r| r.rouge_l).unwrap_or(f64::NAN),
            args.out.join("final").display(),
            args.out.display()
        );
        Ok(())
    }
}

fn append_metric(path: &Path, row: &MetricRow) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{}", serde_json::to_string(row)?)?;
    Ok(())
}

fn read_existing_metrics(path: &Path) -> Vec<MetricRow> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<MetricRow>(l).ok())
        .collect()
}

/// `(step, value)` for every row where `value` is present.
fn curve(rows: &[MetricRow], value: impl Fn(&MetricRow) -> Option<f64>) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| value(r).map(|v| (r.step as f64, v)))
        .collect()
}

fn write_reports(out: &Path, rows: &[MetricRow]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "step,loss,lr,grad_norm,tokens_per_s,eval_loss,rouge1,rouge2,rougeL,padded_tokens_per_s\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            r.step,
            r.loss,
            r.lr,
            r.grad_norm,
            r.tokens_per_s,
            opt(r.eval_loss),
            opt(r.rouge1),
            opt(r.rouge2),
            opt(r.rouge_l),
            r.padded_tokens_per_s
        ));
    }
    std::fs::write(out.join("metrics.csv"), csv)?;
    write_line_chart(
        &out.join("loss.svg"),
        "Loss",
        "step",
        "token cross-entropy",
        &[
            Series::new("train", curve(rows, |r| Some(r.loss))),
            Series::new("eval", curve(rows, |r| r.eval_loss)),
        ],
    )?;
    write_line_chart(
        &out.join("rouge.svg"),
        "Eval ROUGE",
        "step",
        "F-measure",
        &[
            Series::new("ROUGE-L", curve(rows, |r| r.rouge_l)),
            Series::new("ROUGE-1", curve(rows, |r| r.rouge1)),
        ],
    )?;
    Ok(())
}
