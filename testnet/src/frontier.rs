//! `meshtune-testnet frontier`: final ROUGE-L against bytes per node per round for each
//! exchange (codec), on several workloads, over several seeds; the table, a chart per workload
//! (bytes on a log axis) and the verdict on the default exchange.
//!
//! Owns: the workloads (each one a `meshtune-testnet` command line, printed in the table),
//! the loop over workloads and seeds, the aggregation over seeds and the verdict. Must not
//! touch: the runs themselves (`local::run_comparison` runs them as the testnet always does:
//! node processes on loopback, baselines as `meshtune train` processes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser};

use crate::chart::{ChartText, FrontierPoint, frontier_chart_svg};
use crate::local::{Comparison, TestnetArgs, run_comparison};
use crate::png::write_png;
use crate::task::TaskArgs;

/// The codec a node uses when none is given (`meshtune node`, `meshtune-testnet`).
pub const DEFAULT_CODEC: &str = meshtune_protocol::DEFAULT_CODEC;

/// Flags of `meshtune-testnet frontier`.
#[derive(Debug, Clone, Args)]
pub struct FrontierArgs {
    /// Workloads: `bundled` (the default run: 20 rounds x 8 local steps on the bundled task),
    /// `long` (10 rounds x 50 local steps from scratch on the harder potluck corpus),
    /// `finetune` (a model pre-trained on the bundled task, fine-tuned on potluck), and
    /// `finetune-lora` (the same with LoRA adapters).
    #[arg(long, value_delimiter = ',', default_values_t = ["bundled".to_string(), "long".to_string(), "finetune".to_string(), "finetune-lora".to_string()])]
    pub workloads: Vec<String>,
    /// Exchanges to compare; `f32` is always run (the quality to keep) and the default codec
    /// is always judged.
    #[arg(long, value_delimiter = ',', default_values_t = [
        "int8/64+zstd:1".to_string(),
        "top10%+int8/64+zstd:1".to_string(),
        DEFAULT_CODEC.to_string(),
    ])]
    pub codecs: Vec<String>,
    /// Seeds (data split, initialization, data order); at least 3 for a figure with a spread.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2, 3])]
    pub seeds: Vec<u64>,
    /// The exchange the verdict is about (default: the node's default codec).
    #[arg(long, default_value = DEFAULT_CODEC)]
    pub judge: String,
    /// Also train centralized on the union of the shards (twice the mesh's compute).
    #[arg(long)]
    pub centralized: bool,
    /// Every mesh keeps each node's unsent residual in its own model (`--keep-residual`).
    #[arg(long)]
    pub keep_residual: bool,
    /// Every mesh's nodes decay their error-feedback residual by this each round
    /// (`--ef-decay`).
    #[arg(long)]
    pub ef_decay: Option<f32>,
    /// Every mesh's nodes discount re-learnt progress from their residual (`--ef-relearn`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ef_relearn: Option<bool>,
    /// Every mesh's nodes bound their residual by this many times the new delta's norm
    /// (`--ef-bound`).
    #[arg(long)]
    pub ef_bound: Option<f32>,
    /// Every mesh's nodes train the next round while this one is exchanged (`--overlap`).
    #[arg(long)]
    pub overlap: bool,
    /// The repository's `fixtures/` folder (the potluck corpus and the pre-trained model).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"))]
    pub fixtures: PathBuf,
    /// Shrink every workload to 2 nodes, 2 rounds of 2 steps and 4 eval examples: checks the
    /// plumbing in a minute; its numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Output directory (default: testnet-runs/frontier-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rewrite the table and charts of a finished frontier from its `frontier.json`.
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

/// `frontier.json`: the command line of each workload and every outcome.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    commands: BTreeMap<String, Vec<String>>,
    outcomes: Vec<Outcome>,
}

/// One workload of the frontier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Bundled,
    Long,
    Finetune,
    FinetuneLora,
}

impl Workload {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "bundled" => Self::Bundled,
            "long" => Self::Long,
            "finetune" => Self::Finetune,
            "finetune-lora" => Self::FinetuneLora,
            other => anyhow::bail!(
                "unknown workload `{other}`: use bundled, long, finetune or finetune-lora"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bundled => "bundled",
            Self::Long => "long",
            Self::Finetune => "finetune",
            Self::FinetuneLora => "finetune-lora",
        }
    }

    /// The `meshtune-testnet` flags of this workload (before the seed, codecs and output).
    pub fn flags(self, fixtures: &Path) -> Vec<String> {
        let fixture = |p: &str| fixtures.join(p).display().to_string();
        let potluck = [
            "--train".to_string(),
            fixture("potluck/train.jsonl"),
            "--eval".to_string(),
            fixture("potluck/eval.jsonl"),
            "--eval-examples".to_string(),
            "200".to_string(),
            "--batch-size".to_string(),
            "16".to_string(),
            "--rounds".to_string(),
            "10".to_string(),
            "--eval-every".to_string(),
            "5".to_string(),
        ];
        let mut flags: Vec<String> = match self {
            Self::Bundled => vec!["--eval-examples".into(), "64".into()],
            Self::Long => vec![
                "--model".into(),
                fixture("synthetic"),
                "--random-init".into(),
                "--local-steps".into(),
                "50".into(),
                "--lr".into(),
                "1e-3".into(),
                "--train-config".into(),
                fixture("potluck/long.toml"),
            ],
            Self::Finetune | Self::FinetuneLora => vec![
                "--model".into(),
                fixture("models/meetings-t5"),
                "--local-steps".into(),
                "50".into(),
                "--train-config".into(),
                fixture(if self == Self::Finetune {
                    "potluck/finetune.toml"
                } else {
                    "potluck/finetune-lora.toml"
                }),
            ],
        };
        if self != Self::Bundled {
            flags.extend(potluck);
        }
        if self == Self::FinetuneLora {
            flags.push("--lora".into());
        }
        flags
    }
}

/// Testnet flags parsed as `meshtune-testnet` parses them.
#[derive(Debug, Parser)]
struct TestnetCommand {
    #[command(flatten)]
    testnet: TestnetArgs,
    #[command(flatten)]
    task: TaskArgs,
}

/// Later flags replace earlier ones with the same name (the smoke settings replace the
/// workload's).
fn merge_flags(flags: &[String], overrides: &[String]) -> Vec<String> {
    let mut merged: Vec<Vec<String>> = Vec::new();
    for group in group_flags(flags).into_iter().chain(group_flags(overrides)) {
        merged.retain(|g| g[0] != group[0]);
        merged.push(group);
    }
    merged.concat()
}

/// `["--a", "1", "--b"]` -> `[["--a", "1"], ["--b"]]`.
fn group_flags(flags: &[String]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for flag in flags {
        match groups.last_mut() {
            Some(group) if !flag.starts_with("--") => group.push(flag.clone()),
            _ => groups.push(vec![flag.clone()]),
        }
    }
    groups
}

/// Everything one workload's run for one seed needs: its full command line.
fn command_line(
    workload: Workload,
    args: &FrontierArgs,
    seed: u64,
    out: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut codecs = vec!["f32".to_string()];
    for codec in args.codecs.iter().chain(std::iter::once(&args.judge)) {
        if !codecs.contains(codec) {
            codecs.push(codec.clone());
        }
    }
    let mut overrides = vec![
        "--codec".into(),
        args.judge.clone(),
        "--compare-codecs".into(),
        codecs.join(","),
        "--seed".into(),
        seed.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if !args.centralized {
        overrides.push("--no-centralized".into());
    }
    if args.keep_residual {
        overrides.push("--keep-residual".into());
    }
    if let Some(decay) = args.ef_decay {
        overrides.extend(["--ef-decay".into(), decay.to_string()]);
    }
    if let Some(relearn) = args.ef_relearn {
        overrides.extend(["--ef-relearn".into(), relearn.to_string()]);
    }
    if let Some(bound) = args.ef_bound {
        overrides.push(format!("--ef-bound={bound}"));
    }
    if args.overlap {
        overrides.push("--overlap".into());
    }
    if args.smoke {
        for (flag, value) in [
            ("--nodes", "2"),
            ("--rounds", "2"),
            ("--local-steps", "2"),
            ("--eval-examples", "4"),
            ("--eval-every", "1"),
            ("--examples-per-node", "16"),
        ] {
            overrides.extend([flag.to_string(), value.to_string()]);
        }
    }
    Ok(merge_flags(&workload.flags(&args.fixtures), &overrides))
}

/// One exchange's outcome on one seed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub workload: String,
    pub seed: u64,
    pub exchange: String,
    /// Mean encoded delta per node per round, and its f32 size.
    pub bytes_per_round: f64,
    pub f32_bytes_per_round: f64,
    /// Final ROUGE-L, in points (0-100), mean over nodes.
    pub rouge_l: Option<f64>,
}

fn outcomes(workload: Workload, seed: u64, comparison: &Comparison) -> Vec<Outcome> {
    let mut rows: Vec<Outcome> = comparison
        .runs
        .iter()
        .map(|run| {
            let (encoded, raw) = run.delta_sizes();
            Outcome {
                workload: workload.name().into(),
                seed,
                exchange: run.label(),
                bytes_per_round: encoded,
                f32_bytes_per_round: raw,
                rouge_l: run.final_rouge_l().map(|r| 100.0 * r),
            }
        })
        .collect();
    if let Some(baselines) = &comparison.baselines {
        for (label, value) in [
            (ALONE, baselines.alone_final()),
            (CENTRALIZED, baselines.centralized_final()),
        ] {
            if let Some(value) = value {
                rows.push(Outcome {
                    workload: workload.name().into(),
                    seed,
                    exchange: label.into(),
                    bytes_per_round: 0.0,
                    f32_bytes_per_round: 0.0,
                    rouge_l: Some(100.0 * value),
                });
            }
        }
    }
    rows
}

const ALONE: &str = "each node alone";
const CENTRALIZED: &str = "centralized";

/// Runs every workload for every seed, then writes the frontier. Returns the output folder.
pub fn run(args: FrontierArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.replot {
        let saved: Saved = serde_json::from_str(
            &std::fs::read_to_string(dir.join("frontier.json"))
                .with_context(|| format!("reading {}/frontier.json", dir.display()))?,
        )
        .with_context(|| format!("parsing {}/frontier.json", dir.display()))?;
        write_frontier(dir, &args, &saved.outcomes, &saved.commands)?;
        return Ok(dir.clone());
    }
    let workloads: Vec<Workload> = args
        .workloads
        .iter()
        .map(|w| Workload::parse(w))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!args.seeds.is_empty(), "--seeds: give at least one seed");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::local::default_run_dir("frontier-"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let mut args = args;
    args.fixtures = args
        .fixtures
        .canonicalize()
        .with_context(|| format!("--fixtures {}", args.fixtures.display()))?;
    // Parse every command line before the first run: a bad flag fails in a second, not after
    // an hour.
    let mut plan = Vec::new();
    for &workload in &workloads {
        for &seed in &args.seeds {
            let dir = out.join(workload.name()).join(format!("seed-{seed}"));
            let line = command_line(workload, &args, seed, &dir)?;
            let parsed = TestnetCommand::try_parse_from(
                std::iter::once("meshtune-testnet".to_string()).chain(line.iter().cloned()),
            )
            .with_context(|| format!("workload {}: {}", workload.name(), line.join(" ")))?;
            plan.push((workload, seed, line, parsed));
        }
    }
    let mut all = Vec::new();
    let mut lines = BTreeMap::new();
    let total = plan.len();
    for (k, (workload, seed, line, parsed)) in plan.into_iter().enumerate() {
        tracing::info!(
            workload = workload.name(),
            seed,
            run = k + 1,
            of = total,
            "frontier: starting a workload"
        );
        println!(
            "\n== frontier {}/{total}: {} seed {seed}",
            k + 1,
            workload.name()
        );
        let comparison = run_comparison(parsed.testnet, parsed.task)?;
        all.extend(outcomes(workload, seed, &comparison));
        lines.insert(workload.name().to_string(), line);
        write_frontier(&out, &args, &all, &lines)?;
    }
    Ok(out)
}

/// One exchange on one workload, over seeds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Aggregate {
    pub exchange: String,
    pub bytes_per_round: f64,
    /// f32 bytes / encoded bytes (0 for the baselines).
    pub ratio: f64,
    pub rouge_mean: f64,
    /// Sample standard deviation over seeds (0 for one seed).
    pub rouge_sd: f64,
    pub seeds: usize,
}

/// Mean and sample standard deviation.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The outcomes of one workload, by exchange in first-seen order.
pub fn aggregate(outcomes: &[Outcome], workload: &str) -> Vec<Aggregate> {
    let mut order: Vec<&str> = Vec::new();
    for o in outcomes.iter().filter(|o| o.workload == workload) {
        if !order.contains(&o.exchange.as_str()) {
            order.push(&o.exchange);
        }
    }
    let mut rows: Vec<Aggregate> = order
        .into_iter()
        .map(|exchange| {
            let rows: Vec<&Outcome> = outcomes
                .iter()
                .filter(|o| o.workload == workload && o.exchange == exchange)
                .collect();
            let rouge: Vec<f64> = rows.iter().filter_map(|o| o.rouge_l).collect();
            let (rouge_mean, rouge_sd) = mean_sd(&rouge);
            let bytes = mean_sd(&rows.iter().map(|o| o.bytes_per_round).collect::<Vec<_>>()).0;
            let raw = mean_sd(
                &rows
                    .iter()
                    .map(|o| o.f32_bytes_per_round)
                    .collect::<Vec<_>>(),
            )
            .0;
            Aggregate {
                exchange: exchange.to_string(),
                bytes_per_round: bytes,
                ratio: if bytes > 0.0 { raw / bytes } else { 0.0 },
                rouge_mean,
                rouge_sd,
                seeds: rouge.len(),
            }
        })
        .collect();
    // Exchanges from the most bytes to the fewest, then the baselines (no bytes).
    rows.sort_by(|a, b| b.bytes_per_round.total_cmp(&a.bytes_per_round));
    rows
}

/// The goal for the judged exchange on one workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    /// Judged minus f32 mesh, mean ROUGE-L points.
    pub gap_to_f32: f64,
    /// Judged minus each node alone.
    pub gap_to_alone: Option<f64>,
    pub ratio: f64,
    pub seeds: usize,
    pub met: bool,
}

/// Within 1 point of the f32 mesh (means over seeds), not below each node alone, >= 50x fewer
/// bytes; `None` when the judged exchange or f32 did not run.
pub fn verdict(rows: &[Aggregate], judged: &str) -> Option<Verdict> {
    let find = |name: &str| rows.iter().find(|r| r.exchange == name && r.seeds > 0);
    let judged = find(judged)?;
    let f32_mesh = find("f32")?;
    let gap_to_f32 = judged.rouge_mean - f32_mesh.rouge_mean;
    let gap_to_alone = find(ALONE).map(|a| judged.rouge_mean - a.rouge_mean);
    Some(Verdict {
        gap_to_f32,
        gap_to_alone,
        ratio: judged.ratio,
        seeds: judged.seeds,
        met: gap_to_f32 >= -1.0 && gap_to_alone.is_none_or(|g| g >= 0.0) && judged.ratio >= 50.0,
    })
}

impl Verdict {
    pub fn sentence(&self, judged: &str) -> String {
        let alone = self.gap_to_alone.map_or(String::new(), |g| {
            format!(", {g:+.1} points against each node alone")
        });
        let seeds = match self.seeds {
            n if n >= 3 => format!("means over {n} seeds"),
            1 => "one seed: a single run, within noise".to_owned(),
            n => format!("{n} seeds, fewer than 3: within noise"),
        };
        format!(
            "`{judged}`: {:+.1} ROUGE-L points against the f32 mesh{alone}, {:.0}x fewer bytes \
             ({seeds}): goal (within 1 point of f32, not below alone, >= 50x) {}",
            self.gap_to_f32,
            self.ratio,
            if self.met { "met" } else { "not met" }
        )
    }
}

fn write_frontier(
    out: &Path,
    args: &FrontierArgs,
    outcomes: &[Outcome],
    lines: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<()> {
    let mut md = String::from("# Compression frontier\n\n");
    writeln!(
        md,
        "Final ROUGE-L (points, mean ± sample standard deviation over seeds {:?}) against the \
         encoded delta per node per round. CPU: {}.\n",
        args.seeds,
        cpu_model()
    )?;
    for (workload, line) in lines {
        let rows = aggregate(outcomes, workload);
        writeln!(
            md,
            "## {workload}\n\n`meshtune-testnet {}`\n",
            line.join(" ")
        )?;
        writeln!(
            md,
            "| exchange | bytes / node / round | fewer than f32 | ROUGE-L | seeds |\n|---|---:|---:|---:|---:|"
        )?;
        for r in &rows {
            let (bytes, ratio) = if r.bytes_per_round > 0.0 {
                (
                    format!("{:.0}", r.bytes_per_round),
                    format!("{:.1}x", r.ratio),
                )
            } else {
                ("0".into(), "-".into())
            };
            writeln!(
                md,
                "| {} | {bytes} | {ratio} | {:.1} ± {:.1} | {} |",
                r.exchange, r.rouge_mean, r.rouge_sd, r.seeds
            )?;
        }
        if let Some(v) = verdict(&rows, &args.judge) {
            writeln!(md, "\n{}", v.sentence(&args.judge))?;
        }
        writeln!(md)?;
        let f32_mesh = rows.iter().find(|r| r.exchange == "f32" && r.seeds > 0);
        let goal = f32_mesh.map(|r| r.rouge_mean - 1.0);
        let budget = f32_mesh.map(|r| r.bytes_per_round / 50.0);
        let points: Vec<FrontierPoint> = rows
            .iter()
            .map(|r| FrontierPoint {
                label: r.exchange.clone(),
                bytes: r.bytes_per_round,
                rouge: r.rouge_mean,
                spread: r.rouge_sd,
            })
            .collect();
        let title = format!("{workload}: final ROUGE-L against bytes per node per round");
        let svg = frontier_chart_svg(
            ChartText {
                title: &title,
                x: "encoded delta per node per round (bytes, log scale)",
                y: "final ROUGE-L (points)",
            },
            &points,
            goal,
            budget,
        )?;
        let name = format!("frontier-{workload}");
        std::fs::write(out.join(format!("{name}.svg")), &svg)?;
        write_png(&svg, &out.join(format!("{name}.png")))?;
        writeln!(md, "![{workload}]({name}.png)\n")?;
    }
    std::fs::write(out.join("frontier.md"), &md)?;
    let saved = Saved {
        commands: lines.clone(),
        outcomes: outcomes.to_vec(),
    };
    std::fs::write(
        out.join("frontier.json"),
        serde_json::to_string_pretty(&saved)?,
    )?;
    Ok(())
}

/// `lscpu`'s model name, or `unknown`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(exchange: &str, seed: u64, bytes: f64, rouge: f64) -> Outcome {
        Outcome {
            workload: "long".into(),
            seed,
            exchange: exchange.into(),
            bytes_per_round: bytes,
            f32_bytes_per_round: if bytes > 0.0 { 4_000_000.0 } else { 0.0 },
            rouge_l: Some(rouge),
        }
    }

    #[test]
    fn later_flags_replace_earlier_ones() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let merged = merge_flags(
            &s(&["--rounds", "10", "--lora", "--lr", "1e-3"]),
            &s(&["--rounds", "2", "--seed", "3"]),
        );
        assert_eq!(
            merged,
            s(&["--lora", "--lr", "1e-3", "--rounds", "2", "--seed", "3"])
        );
    }

    #[test]
    fn every_workload_is_a_valid_testnet_command_line() {
        let fixtures = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures"));
        for name in ["bundled", "long", "finetune", "finetune-lora"] {
            let args = Wrap::try_parse_from(["x", "--workloads", name])
                .expect("test value")
                .args;
            let line = command_line(
                Workload::parse(name).expect("test value"),
                &args,
                2,
                Path::new("o"),
            )
            .expect("test value");
            let parsed = TestnetCommand::try_parse_from(
                std::iter::once("t".to_string()).chain(line.iter().cloned()),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(parsed.testnet.seed, 2);
            assert_eq!(parsed.testnet.codec, DEFAULT_CODEC);
            assert!(parsed.testnet.no_centralized);
            assert_eq!(parsed.testnet.compare_codecs[0], "f32");
            if name != "bundled" {
                assert_eq!(parsed.testnet.rounds, 10);
                assert_eq!(parsed.testnet.batch_size, 16);
                let train = parsed.task.train.expect("test value");
                assert!(train.starts_with(&fixtures), "{}", train.display());
                assert!(train.exists() && parsed.task.train_config.expect("test value").exists());
                assert!(parsed.task.model.expect("test value").exists());
            }
            assert_eq!(parsed.task.lora, name == "finetune-lora");
        }
        assert!(Workload::parse("short").is_err());
    }

    /// `x --workloads long` as the frontier's flags.
    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: FrontierArgs,
    }

    #[test]
    fn the_verdict_compares_means_over_seeds_with_f32_and_alone() {
        let mut rows = Vec::new();
        for (seed, noise) in [(1, -0.5), (2, 0.0), (3, 0.5)] {
            rows.push(outcome("f32", seed, 4_000_000.0, 75.0 + noise));
            rows.push(outcome("top2%", seed, 40_000.0, 74.5 - noise));
            rows.push(outcome("top10%", seed, 180_000.0, 69.0));
            rows.push(outcome(ALONE, seed, 0.0, 64.0));
        }
        let agg = aggregate(&rows, "long");
        let names: Vec<&str> = agg.iter().map(|a| a.exchange.as_str()).collect();
        assert_eq!(names, ["f32", "top10%", "top2%", ALONE]);
        assert_eq!(agg[2].ratio, 100.0);
        assert!((agg[0].rouge_sd - 0.5).abs() < 1e-12);
        let met = verdict(&agg, "top2%").expect("test value");
        assert!(met.met && (met.gap_to_f32 + 0.5).abs() < 1e-9, "{met:?}");
        assert!(met.sentence("top2%").contains("means over 3 seeds"));
        // Six points below f32: not met. Below alone: not met even within a point of f32.
        assert!(!verdict(&agg, "top10%").expect("test value").met);
        let mut low = rows.clone();
        low.retain(|o| o.exchange != ALONE);
        low.push(outcome(ALONE, 1, 0.0, 80.0));
        assert!(
            !verdict(&aggregate(&low, "long"), "top2%")
                .expect("test value")
                .met
        );
        // Under 50x: not met.
        let mut dense = rows.clone();
        for o in dense.iter_mut().filter(|o| o.exchange == "top2%") {
            o.bytes_per_round = 1_000_000.0;
        }
        assert!(
            !verdict(&aggregate(&dense, "long"), "top2%")
                .expect("test value")
                .met
        );
        assert!(verdict(&agg, "powersgd").is_none());
        let sentence = |rows: &[Outcome]| {
            verdict(&aggregate(rows, "long"), "top2%")
                .expect("test value")
                .sentence("top2%")
        };
        assert!(sentence(&rows[..4]).contains("one seed: a single run, within noise"));
        assert!(sentence(&rows[..8]).contains("2 seeds, fewer than 3: within noise"));
    }
}
