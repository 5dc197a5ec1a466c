//! `meshtune bench ...`: throughput benchmarks that print ratios against a baseline measured in
//! the same run (PyTorch eager through a committed script), never asserted in tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Args;
use meshtune_model::config::{Preset, T5Config};
use meshtune_model::t5::T5;
use meshtune_model::weights::RandomInit;

use crate::device::DeviceChoice;
use crate::dispatch;

#[derive(Debug, Args)]
pub struct ForwardBenchArgs {
    /// flan-t5-small|base|large|xl (random weights, no download).
    #[arg(long, default_value = "flan-t5-small", conflicts_with = "config")]
    pub preset: String,
    /// A config.json to benchmark instead of a preset (e.g. a fixture model).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub src_len: usize,
    #[arg(long, default_value_t = 128)]
    pub tgt_len: usize,
    /// Timed iterations (after the warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Also run scripts/bench_forward.py (PyTorch eager) on the identical config and print
    /// meshtune/PyTorch.
    #[arg(long)]
    pub compare_pytorch: bool,
    /// Python interpreter with torch and transformers installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Threads for PyTorch (default: all cores, like meshtune's CPU backend).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ForwardMeasurement {
    pub engine: String,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
}

fn bench_config(args: &ForwardBenchArgs) -> anyhow::Result<(String, T5Config)> {
    match &args.config {
        Some(path) => Ok((path.display().to_string(), T5Config::from_file(path)?)),
        None => {
            let preset: Preset = args.preset.parse()?;
            Ok((preset.name().to_string(), preset.config()))
        }
    }
}

pub fn forward(args: ForwardBenchArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.src_len == 0 || args.tgt_len == 0 || args.iters == 0 {
        anyhow::bail!("--batch, --src-len, --tgt-len and --iters must be at least 1");
    }
    let (name, config) = bench_config(&args)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    tracing::info!(model = %name, batch = args.batch, src_len = args.src_len, tgt_len = args.tgt_len, loadavg = %loadavg.trim(), "bench forward");
    let ours = dispatch!(args.device, forward_on(&config, &args))?;
    let mut rows = vec![ours.clone()];
    if args.compare_pytorch {
        rows.push(pytorch_forward(&config, &args)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": name, "batch": args.batch, "src_len": args.src_len, "tgt_len": args.tgt_len,
                "device": args.device.to_string(), "loadavg": loadavg.trim(), "results": rows,
            })
        );
        return Ok(());
    }
    println!(
        "forward  {name}  batch {}  src {}  tgt {}  device {}  (loadavg {})",
        args.batch,
        args.src_len,
        args.tgt_len,
        args.device,
        loadavg.trim()
    );
    println!(
        "{:<22} {:>12} {:>14} {:>10}",
        "engine", "ms/step", "tokens/s", "ratio"
    );
    for row in &rows {
        println!(
            "{:<22} {:>12.1} {:>14.0} {:>9.2}x",
            row.engine,
            row.ms_per_step,
            row.tokens_per_s,
            row.tokens_per_s / rows[rows.len() - 1].tokens_per_s
        );
    }
    if rows.len() == 2 {
        println!(
            "meshtune/PyTorch throughput: {:.2}x",
            ours.tokens_per_s / rows[1].tokens_per_s
        );
    }
    Ok(())
}

fn forward_on<B: Backend>(
    device: B::Device,
    config: &T5Config,
    args: &ForwardBenchArgs,
) -> anyhow::Result<ForwardMeasurement> {
    let model = T5::<B>::from_source(config, &mut RandomInit::<B>::new(config, &device, 0))?;
    let ids = |len: usize| {
        Tensor::<B, 2>::random(
            [args.batch, len],
            Distribution::Uniform(2.0, config.vocab_size as f64 - 1.0),
            &device,
        )
        .int()
    };
    let input_ids = ids(args.src_len);
    let decoder_ids = ids(args.tgt_len);
    let mask = Tensor::<B, 2, Int>::ones([args.batch, args.src_len], &device);
    let step = || -> anyhow::Result<()> {
        let (_, logits) = model.forward(input_ids.clone(), mask.clone(), decoder_ids.clone());
        // Reading one value back forces the whole step to finish on asynchronous backends.
        let _ = logits.sum().into_scalar();
        B::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
        Ok(())
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let start = Instant::now();
    for i in 0..args.iters {
        step()?;
        tracing::debug!(
            iter = i,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "step"
        );
    }
    let seconds = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(ForwardMeasurement {
        engine: format!("meshtune (burn {})", args.device),
        ms_per_step: seconds * 1e3,
        tokens_per_s: (args.batch * (args.src_len + args.tgt_len)) as f64 / seconds,
    })
}

/// Path of a committed script, found next to the workspace or the current directory.
pub fn script_path(name: &str) -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(name),
        PathBuf::from("scripts").join(name),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| format!("scripts/{name} not found (run from the meshtune checkout)"))
}

/// The shape and machine settings both PyTorch baselines take.
struct ScriptRun<'a> {
    python: &'a str,
    script: &'a str,
    config: &'a T5Config,
    batch: usize,
    src_len: usize,
    tgt_len: usize,
    iters: usize,
    warmup: usize,
    threads: Option<usize>,
    device: DeviceChoice,
}

/// Runs a committed PyTorch baseline script on the same `config.json` and shape, plus
/// `extra` arguments; its last stdout line is a JSON object with at least `ms_per_step`.
fn run_pytorch_script(run: &ScriptRun<'_>, extra: &[String]) -> anyhow::Result<serde_json::Value> {
    let script = script_path(run.script)?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, run.config.to_hf_json()?)?;
    let threads = run
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let device = match run.device {
        DeviceChoice::Cpu => "cpu".to_string(),
        DeviceChoice::Cuda(i) => format!("cuda:{i}"),
    };
    let output = Command::new(run.python)
        .arg(&script)
        .args(["--config", &config_path.display().to_string()])
        .args(["--batch", &run.batch.to_string()])
        .args(["--src-len", &run.src_len.to_string()])
        .args(["--tgt-len", &run.tgt_len.to_string()])
        .args(["--iters", &run.iters.to_string()])
        .args(["--warmup", &run.warmup.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", &device])
        .args(extra)
        .output()
        .with_context(|| format!("running {} {}", run.python, script.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "PyTorch baseline failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("unexpected PyTorch output {last:?}"))?;
    value["ms_per_step"].as_f64().context("ms_per_step")?;
    Ok(value)
}

fn pytorch_forward(
    config: &T5Config,
    args: &ForwardBenchArgs,
) -> anyhow::Result<ForwardMeasurement> {
    let value = run_pytorch_script(
        &ScriptRun {
            python: &args.python,
            script: "bench_forward.py",
            config,
            batch: args.batch,
            src_len: args.src_len,
            tgt_len: args.tgt_len,
            iters: args.iters,
            warmup: args.warmup,
            threads: args.threads,
            device: args.device,
        },
        &[],
    )?;
    let ms = value["ms_per_step"].as_f64().unwrap_or(f64::NAN);
    Ok(ForwardMeasurement {
        engine: format!("PyTorch {} eager", value["torch"].as_str().unwrap_or("?")),
        ms_per_step: ms,
        tokens_per_s: (args.batch * (args.src_len + args.tgt_len)) as f64 / (ms / 1e3),
    })
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// flan-t5-small|base|large|xl (random weights, no download).
    #[arg(long, default_value = "flan-t5-small", conflicts_with = "config")]
    pub preset: String,
    /// A config.json to benchmark instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub src_len: usize,
    #[arg(long, default_value_t = 128)]
    pub tgt_len: usize,
    /// Train LoRA adapters (rank 8, alpha 16, on q and v) instead of all weights.
    #[arg(long)]
    pub lora: bool,
    /// auto (from the device), f32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub precision: meshtune_model::precision::PrecisionChoice,
    /// Recompute element-wise activations in the backward pass instead of keeping them
    /// (burn's balanced checkpointing): less memory, some more compute.
    #[arg(long)]
    pub activation_checkpointing: bool,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Peak TFLOP/s of the device for MFU, or --device-peak NAME from the built-in table.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// jetson-agx-orin-64gb, jetson-agx-orin-32gb, jetson-orin-nx-16gb, a100-sxm, h100-sxm,
    /// h200-sxm.
    #[arg(long)]
    pub device_peak: Option<String>,
    /// Also run scripts/bench_train.py (PyTorch eager, the same step) and print
    /// meshtune/PyTorch.
    #[arg(long)]
    pub compare_pytorch: bool,
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// One measured training configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainMeasurement {
    pub engine: String,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    /// Model FLOP utilization, when a peak is known.
    pub mfu: Option<f64>,
    /// Peak resident memory of the process while it ran (CPU), MiB.
    pub peak_rss_mib: Option<f64>,
}

/// `meshtune bench train`: one optimizer step (forward, backward, global-norm clipping, AdamW)
/// on random weights and tokens, with MFU and peak memory; with `--compare-pytorch`, the same
/// step in PyTorch eager in the same run.
pub fn train(args: TrainBenchArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.src_len == 0 || args.tgt_len == 0 || args.iters == 0 {
        anyhow::bail!("--batch, --src-len, --tgt-len and --iters must be at least 1");
    }
    let (name, config) = match &args.config {
        Some(path) => (path.display().to_string(), T5Config::from_file(path)?),
        None => {
            let preset: Preset = args.preset.parse()?;
            (preset.name().to_string(), preset.config())
        }
    };
    let (precision, reason) = meshtune_model::precision::resolve_precision(
        args.precision,
        &crate::device::device_info(args.device),
    );
    let peak = args.peak_tflops.or_else(|| {
        args.device_peak
            .as_deref()
            .and_then(meshtune_model::flops::device_peak)
            .map(|p| match precision {
                meshtune_model::precision::Precision::F32 => p.fp32,
                meshtune_model::precision::Precision::Bf16 => p.bf16,
                meshtune_model::precision::Precision::F16 => p.fp16,
            })
    });
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    tracing::info!(model = %name, batch = args.batch, src_len = args.src_len, tgt_len = args.tgt_len, lora = args.lora, %precision, reason, loadavg = %loadavg.trim(), "bench train");
    let flops = meshtune_model::flops::train_flops_per_step(
        &config,
        args.batch,
        args.src_len,
        args.tgt_len,
    );
    let ours = match (args.device, args.activation_checkpointing) {
        (DeviceChoice::Cpu, false) => train_step_on::<meshtune_model::backend::CpuTrain>(
            Default::default(),
            &config,
            &args,
            precision,
            flops,
            peak,
        )?,
        (DeviceChoice::Cpu, true) => {
            train_step_on::<meshtune_model::backend::CpuTrainCheckpointed>(
                Default::default(),
                &config,
                &args,
                precision,
                flops,
                peak,
            )?
        }
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), false) => train_step_on::<meshtune_model::backend::CudaTrain>(
            burn::backend::cuda::CudaDevice::new(index),
            &config,
            &args,
            precision,
            flops,
            peak,
        )?,
        #[cfg(feature = "cuda")]
        (DeviceChoice::Cuda(index), true) => {
            train_step_on::<meshtune_model::backend::CudaTrainCheckpointed>(
                burn::backend::cuda::CudaDevice::new(index),
                &config,
                &args,
                precision,
                flops,
                peak,
            )?
        }
        #[cfg(not(feature = "cuda"))]
        (DeviceChoice::Cuda(_), _) => anyhow::bail!(
            "this meshtune was built without CUDA: rebuild with `cargo build --release --features cuda`"
        ),
    };
    let mut rows = vec![ours.clone()];
    if args.compare_pytorch {
        rows.push(pytorch_train(&config, &args, precision, flops, peak)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": name, "batch": args.batch, "src_len": args.src_len, "tgt_len": args.tgt_len,
                "lora": args.lora, "precision": precision.to_string(), "device": args.device.to_string(),
                "activation_checkpointing": args.activation_checkpointing,
                "flops_per_step": flops, "peak_tflops": peak, "loadavg": loadavg.trim(), "results": rows,
            })
        );
        return Ok(());
    }
    println!(
        "train  {name}  {}  batch {}  src {}  tgt {}  {precision}  device {}  (loadavg {})",
        if args.lora { "lora" } else { "full" },
        args.batch,
        args.src_len,
        args.tgt_len,
        args.device,
        loadavg.trim()
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>12} {:>8}",
        "engine", "ms/step", "tokens/s", "samples/s", "MFU", "peak RSS", "ratio"
    );
    let baseline = rows[rows.len() - 1].tokens_per_s;
    for row in &rows {
        println!(
            "{:<24} {:>10.0} {:>10.0} {:>10.2} {:>8} {:>12} {:>7.2}x",
            row.engine,
            row.ms_per_step,
            row.tokens_per_s,
            row.samples_per_s,
            row.mfu
                .map_or("n/a".to_string(), |m| format!("{:.1}%", m * 100.0)),
            row.peak_rss_mib
                .map_or("n/a".to_string(), |m| format!("{m:.0} MiB")),
            row.tokens_per_s / baseline
        );
    }
    if rows.len() == 2 {
        println!(
            "meshtune/PyTorch training throughput: {:.2}x",
            ours.tokens_per_s / rows[1].tokens_per_s
        );
    }
    Ok(())
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn train_step_on<B: burn::tensor::backend::AutodiffBackend>(
    device: B::Device,
    config: &T5Config,
    args: &TrainBenchArgs,
    precision: meshtune_model::precision::Precision,
    flops: f64,
    peak: Option<f64>,
) -> anyhow::Result<TrainMeasurement> {
    use meshtune_model::train::{StepConfig, TrainState};
    let mut model = T5::<B>::from_source(config, &mut RandomInit::<B>::new(config, &device, 0))?;
    if args.lora {
        model = meshtune_model::lora::attach_lora(
            model,
            &meshtune_model::lora::LoraConfig::default(),
            &mut meshtune_model::lora::PeftInit::<B> {
                device: device.clone(),
            },
        )?;
    }
    let step_config = StepConfig {
        lr: 1e-4,
        adamw: meshtune_model::optim::AdamWConfig::default(),
        schedule: meshtune_model::optim::ScheduleKind::Constant,
        warmup_steps: 0,
        total_steps: args.warmup + args.iters,
        max_grad_norm: Some(1.0),
        precision,
        optimizer: Default::default(),
    };
    let mut state = TrainState::new(model, step_config);
    // Deterministic pseudo-random token ids (ids 2.. so no padding or eos).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let vocab = config.vocab_size.max(3) as u64;
    let mut ids = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (2 + x % (vocab - 2)) as u32
            })
            .collect()
    };
    let sources: Vec<Vec<u32>> = (0..args.batch).map(|_| ids(args.src_len)).collect();
    let targets: Vec<Vec<u32>> = (0..args.batch).map(|_| ids(args.tgt_len)).collect();
    let batch = meshtune_model::score::Seq2SeqBatch::new(
        &sources,
        &targets,
        config.pad_token_id,
        config.decoder_start_id(),
    )?;
    let real_tokens =
        batch.attention_mask.iter().filter(|&&m| m != 0).count() + batch.target_tokens();
    let micro = vec![batch];
    for _ in 0..args.warmup {
        state.step(&micro)?;
    }
    B::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
    let start = Instant::now();
    for i in 0..args.iters {
        let stats = state.step(&micro)?;
        tracing::debug!(iter = i, loss = stats.loss, "step");
    }
    B::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
    let seconds = start.elapsed().as_secs_f64() / args.iters as f64;
    Ok(TrainMeasurement {
        engine: format!(
            "meshtune (burn {}{})",
            args.device,
            if args.activation_checkpointing {
                ", ckpt"
            } else {
                ""
            }
        ),
        ms_per_step: seconds * 1e3,
        // Non-padding tokens (source mask + labels); these full-length random rows have no
        // padding, so it equals batch x (src + tgt), and PyTorch's row counts the same.
        tokens_per_s: real_tokens as f64 / seconds,
        samples_per_s: args.batch as f64 / seconds,
        mfu: peak.map(|p| meshtune_model::flops::mfu(flops, seconds, p)),
        peak_rss_mib: matches!(args.device, DeviceChoice::Cpu)
            .then(peak_rss_mib)
            .flatten(),
    })
}

fn pytorch_train(
    config: &T5Config,
    args: &TrainBenchArgs,
    precision: meshtune_model::precision::Precision,
    flops: f64,
    peak: Option<f64>,
) -> anyhow::Result<TrainMeasurement> {
    let mut extra = vec!["--precision".to_string(), precision.to_string()];
    if args.lora {
        extra.push("--lora".into());
    }
    let value = run_pytorch_script(
        &ScriptRun {
            python: &args.python,
            script: "bench_train.py",
            config,
            batch: args.batch,
            src_len: args.src_len,
            tgt_len: args.tgt_len,
            iters: args.iters,
            warmup: args.warmup,
            threads: args.threads,
            device: args.device,
        },
        &extra,
    )?;
    let ms = value["ms_per_step"].as_f64().unwrap_or(f64::NAN);
    let seconds = ms / 1e3;
    Ok(TrainMeasurement {
        engine: format!("PyTorch {} eager", value["torch"].as_str().unwrap_or("?")),
        ms_per_step: ms,
        // The same full-length random rows as ours: no padding, every token counts.
        tokens_per_s: (args.batch * (args.src_len + args.tgt_len)) as f64 / seconds,
        samples_per_s: args.batch as f64 / seconds,
        mfu: peak.map(|p| meshtune_model::flops::mfu(flops, seconds, p)),
        peak_rss_mib: value["peak_rss_mib"].as_f64(),
    })
}

#[derive(Debug, Args)]
pub struct CodecBenchArgs {
    /// Parameters in the synthetic delta (default: flan-t5-base, 247,577,856).
    #[arg(long, default_value_t = 247_577_856)]
    pub params: usize,
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    #[arg(long, default_value_t = 64)]
    pub block_size: u32,
    /// Encode/decode this many times and keep the fastest.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

/// `meshtune bench codec`: bytes vs raw f32, single-core encode/decode GB/s and reconstruction
/// error of every codec on a heavy-tailed flan-t5-base-sized delta.
pub fn codec(args: CodecBenchArgs) -> anyhow::Result<()> {
    use meshtune_protocol::bench::{CodecBenchConfig, render_table, run_codec_bench};
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let config = CodecBenchConfig {
        params: args.params,
        zstd_level: args.zstd_level,
        block_size: args.block_size,
        repeats: args.repeats.max(1),
        ..CodecBenchConfig::default()
    };
    let rows = run_codec_bench(&config)?;
    println!(
        "codec benchmark: {} parameters ({:.0} MB f32), loadavg {}",
        args.params,
        args.params as f64 * 4.0 / 1e6,
        loadavg.trim()
    );
    print!("{}", render_table(&rows));
    Ok(())
}

#[derive(Debug, Args)]
pub struct LinkBenchArgs {
    /// Link profiles to check (presets or KEY=VALUE settings, see `meshtune node --link`);
    /// default: every preset.
    #[arg(long = "profile")]
    pub profiles: Vec<String>,
    /// Seconds of transfer per direction at the profile's rate (sets the transfer size).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// 1-byte round trips measured (the median is reported).
    #[arg(long, default_value_t = 21)]
    pub pings: usize,
}

/// `meshtune bench link`: measures the transport's link shaping on a loopback TCP connection
/// and prints measured / expected for upload time, download time and round trip, so the
/// profiles the testnet uses are checked to be what they claim (within 10%). Fails (exits
/// non-zero) when a figure is off by more; a round trip without added delay is not checked.
pub fn link(args: LinkBenchArgs) -> anyhow::Result<()> {
    use meshtune_net::shaping::{LinkProfile, measure};
    let profiles: Vec<(String, LinkProfile)> = if args.profiles.is_empty() {
        LinkProfile::PRESETS
            .iter()
            .map(|(name, p)| ((*name).to_owned(), *p))
            .collect()
    } else {
        args.profiles
            .iter()
            .map(|text| Ok((text.clone(), text.parse::<LinkProfile>()?)))
            .collect::<anyhow::Result<_>>()?
    };
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be positive"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "link shaping check on loopback TCP (expected from the profile; ratio = measured / expected), loadavg {}",
        loadavg.trim()
    );
    println!(
        "{:<8} | {:>9} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>9} {:>9} {:>6} | within 10%",
        "profile",
        "bytes",
        "up exp",
        "up meas",
        "ratio",
        "down exp",
        "down meas",
        "ratio",
        "rtt exp",
        "rtt meas",
        "ratio"
    );
    let mut all_within = true;
    for (name, profile) in profiles {
        let slowest = profile
            .up_bps
            .into_iter()
            .chain(profile.down_bps)
            .min()
            .unwrap_or(8_000_000_000);
        let bytes = ((slowest as f64 / 8.0 * args.seconds) as u64).clamp(64 * 1024, 256 << 20);
        let m = runtime.block_on(measure(profile, bytes, args.pings))?;
        let (up, down, rtt) = m.ratios();
        // No added delay (lan): the round trip is loopback's own, nothing to check it against.
        let rtt = if profile.delay.is_zero() {
            f64::NAN
        } else {
            rtt
        };
        let ok = |r: f64| r.is_nan() || (0.9..=1.1).contains(&r);
        let within = ok(up) && ok(down) && ok(rtt);
        all_within &= within;
        let ms = |d: std::time::Duration| format!("{:.1}ms", d.as_secs_f64() * 1e3);
        let ratio = |r: f64| {
            if r.is_nan() {
                "n/a".to_owned()
            } else {
                format!("{r:.3}")
            }
        };
        println!(
            "{:<8} | {:>9} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>9} {:>9} {:>6} | {}",
            name,
            bytes,
            ms(m.upload_expected),
            ms(m.upload_measured),
            ratio(up),
            ms(m.download_expected),
            ms(m.download_measured),
            ratio(down),
            ms(m.rtt_expected),
            ms(m.rtt_measured),
            ratio(rtt),
            if within { "yes" } else { "no" }
        );
    }
    anyhow::ensure!(
        all_within,
        "some figures are off by more than 10% (delays under ~2 ms are at tokio's 1 ms timer \
         granularity; a loaded machine only slows things down)"
    );
    println!("every profile within 10% of what it claims");
    Ok(())
}
