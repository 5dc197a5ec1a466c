//! The testnet report: every node's round records as JSON and CSV, charts (SVG and PNG) of
//! loss, ROUGE-L, bytes and round time, and `summary.md` comparing federated training with
//! each node alone, centralized training and other codecs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use meshtune_node::coordinator::RoundRecord;

use crate::chart::{ChartText, Series, line_chart_svg};
use crate::png::write_png;

/// The settings of a testnet run that the report states (what `meshtune-testnet` was asked
/// for, the model and data it ran on).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunConfig {
    pub nodes: usize,
    pub rounds: u64,
    pub local_steps: usize,
    pub codec: String,
    pub aggregation: String,
    pub split: String,
    /// `tiny`, a preset name or the model folder.
    pub model: String,
    /// `bundled synthetic corpus` or the training file.
    pub data: String,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub mode: String,
    pub link: Option<String>,
    pub eval_examples: usize,
}

/// One federated run: the records of every node.
#[derive(Debug, Clone)]
pub struct FederatedRun {
    pub codec: String,
    /// `--outer` of this run.
    pub outer: String,
    /// Whether its nodes overlapped the exchange with the next round's training.
    pub overlap: bool,
    /// `records[node][round]`.
    pub records: Vec<Vec<RoundRecord>>,
    pub seconds: f64,
    /// `--scenario` of this run and what it did.
    pub scenario: String,
    pub faults: Vec<String>,
}

impl FederatedRun {
    /// `codec`, plus the outer optimizer when it is not plain averaging.
    pub fn label(&self) -> String {
        let mut label = self.codec.clone();
        if self.outer != "average" {
            label.push_str(&format!(", outer {}", self.outer));
        }
        if self.overlap {
            label.push_str(", overlap");
        }
        label
    }

    /// Time training over wall time, over every node-round that reports it.
    pub fn utilization(&self) -> Option<f64> {
        let (mut comp, mut wall) = (0.0, 0.0);
        for r in self.records.iter().flatten() {
            if let (Some(c), Some(w)) = (r.timing.t_comp_s, r.timing.t_wait_s) {
                comp += c;
                wall += c + w;
            }
        }
        (wall > 0.0).then(|| comp / wall)
    }

    /// Mean ROUGE-L over nodes of the last evaluated round.
    pub fn final_rouge_l(&self) -> Option<f64> {
        final_rouge_of(self, |_| true)
    }

    /// Mean over nodes of the bytes each sent on the wire during the run.
    pub fn bytes_sent_per_node(&self) -> f64 {
        let totals: Vec<u64> = self
            .records
            .iter()
            .map(|r| r.iter().map(|x| x.wire_out).sum())
            .collect();
        totals.iter().sum::<u64>() as f64 / totals.len().max(1) as f64
    }

    /// Mean encoded delta size and raw f32 size per node-round.
    pub fn delta_sizes(&self) -> (f64, f64) {
        let all: Vec<&RoundRecord> = self.records.iter().flatten().collect();
        let n = all.len().max(1) as f64;
        (
            all.iter().map(|r| r.delta_bytes as f64).sum::<f64>() / n,
            all.iter().map(|r| r.raw_delta_bytes as f64).sum::<f64>() / n,
        )
    }

    fn mean_by_round(&self, value: impl Fn(&RoundRecord) -> Option<f64>) -> Vec<(f64, f64)> {
        let rounds = self
            .records
            .iter()
            .flatten()
            .map(|r| r.round + 1)
            .max()
            .unwrap_or(0);
        (0..rounds)
            .filter_map(|round| {
                let values: Vec<f64> = self
                    .records
                    .iter()
                    .filter_map(|r| r.iter().find(|x| x.round == round).and_then(&value))
                    .collect();
                (!values.is_empty()).then(|| {
                    (
                        (round + 1) as f64,
                        values.iter().sum::<f64>() / values.len() as f64,
                    )
                })
            })
            .collect()
    }
}

/// The non-federated baselines: ROUGE-L curves as (step, value).
#[derive(Debug, Clone)]
pub struct Baselines {
    pub alone: Vec<Vec<(usize, f64)>>,
    /// The best of the centralized runs (by final ROUGE-L).
    pub centralized: Vec<(usize, f64)>,
    pub centralized_lr: f64,
    /// Every centralized run: learning rate and final ROUGE-L.
    pub centralized_tried: Vec<(f64, Option<f64>)>,
    pub steps_per_node: usize,
    pub seconds: f64,
}

impl Baselines {
    pub fn alone_final(&self) -> Option<f64> {
        let finals: Vec<f64> = self
            .alone
            .iter()
            .filter_map(|c| c.last().map(|p| p.1))
            .collect();
        (!finals.is_empty()).then(|| finals.iter().sum::<f64>() / finals.len() as f64)
    }

    pub fn centralized_final(&self) -> Option<f64> {
        self.centralized.last().map(|p| p.1)
    }
}

fn chart(dir: &Path, name: &str, text: ChartText<'_>, series: &[Series]) -> anyhow::Result<()> {
    let svg = line_chart_svg(text, series)?;
    std::fs::write(dir.join(format!("{name}.svg")), &svg)?;
    if let Err(err) = write_png(&svg, &dir.join(format!("{name}.png"))) {
        tracing::warn!(chart = name, error = %format!("{err:#}"), "PNG not written (the SVG is)");
    }
    Ok(())
}

/// Final ROUGE-L, mean over the nodes in `nodes`. A node that ended on a catch-up (it adopted
/// a peer's state after its last evaluation) is left out: its last score is of an older model,
/// and the model it holds is scored by the nodes that made it.
fn final_rouge_of(run: &FederatedRun, nodes: impl Fn(usize) -> bool) -> Option<f64> {
    let finals: Vec<f64> = run
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| nodes(*i))
        .filter(|(_, r)| r.last().is_none_or(|x| x.synced_from.is_none()))
        .filter_map(|(_, r)| r.iter().rev().find_map(|x| x.rouge_l))
        .collect();
    (!finals.is_empty()).then(|| finals.iter().sum::<f64>() / finals.len() as f64)
}

fn mean_round_seconds(run: &FederatedRun, nodes: impl Fn(usize) -> bool) -> (f64, f64) {
    let rows: Vec<&RoundRecord> = run
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| nodes(*i))
        .flat_map(|(_, r)| r.iter())
        .collect();
    let n = rows.len().max(1) as f64;
    (
        rows.iter().map(|r| r.seconds_total).sum::<f64>() / n,
        rows.iter().map(|r| r.seconds_train).sum::<f64>() / n,
    )
}

/// What the scenario shows, against the clean run where there is one.
fn scenario_verdict(
    md: &mut String,
    run: &FederatedRun,
    clean: Option<&FederatedRun>,
    distinct_finals: usize,
) -> anyhow::Result<()> {
    let last = run.records.len().saturating_sub(1);
    let clean_rouge = clean.and_then(FederatedRun::final_rouge_l);
    match run.scenario.as_str() {
        "partition" => writeln!(
            md,
            "- **{}**: after healing the halves hold {distinct_finals} distinct final model(s)",
            if distinct_finals == 1 {
                "reconverged"
            } else {
                "not reconverged"
            }
        )?,
        "byzantine" => {
            let honest = final_rouge_of(run, |i| i != last);
            let rejected: u64 = run
                .records
                .iter()
                .take(last)
                .flatten()
                .flat_map(|r| r.rejected.values())
                .sum();
            let mut honest_finals: Vec<&str> = run.records[..last]
                .iter()
                .filter_map(|r| r.last().map(|x| x.model_hash.as_str()))
                .collect();
            honest_finals.sort_unstable();
            honest_finals.dedup();
            writeln!(
                md,
                "- honest nodes refused or left out {rejected} delta(s) in all and hold {} distinct final model(s); their final ROUGE-L {} vs {} without the byzantine node",
                honest_finals.len(),
                fmt_opt(honest),
                fmt_opt(clean_rouge)
            )?;
            if let (Some(h), Some(c), Some(clean)) = (honest, clean_rouge, clean) {
                let honest_run = FederatedRun {
                    records: run.records[..last].to_vec(),
                    ..run.clone()
                };
                writeln!(md, "- {}", robust_verdict(h, c, &honest_run, clean))?;
            }
        }
        "slow-link" => {
            let (slow_total, slow_train) = mean_round_seconds(run, |i| i == last);
            let (fast_total, _) = mean_round_seconds(run, |i| i != last);
            let slow_wire: u64 = run.records[last]
                .iter()
                .map(|r| r.wire_in + r.wire_out)
                .sum();
            writeln!(
                md,
                "- the slow node: {slow_total:.1} s per round ({slow_train:.1} s compute, {:.1} s communication and waiting), {} on its link; the others {fast_total:.1} s per round",
                (slow_total - slow_train).max(0.0),
                human(slow_wire as f64)
            )?;
            if let Some(clean) = clean {
                let (clean_total, _) = mean_round_seconds(clean, |_| true);
                writeln!(
                    md,
                    "- without the slow link: {clean_total:.1} s per round ({:.2}x)",
                    fast_total / clean_total.max(1e-9)
                )?;
            }
        }
        _ => {}
    }
    if run.scenario != "byzantine" {
        writeln!(
            md,
            "- final ROUGE-L {} vs {} without the scenario",
            fmt_opt(run.final_rouge_l()),
            fmt_opt(clean_rouge)
        )?;
    }
    Ok(())
}

/// Whether robust aggregation kept the honest nodes' final ROUGE-L (`honest`) within 1 point
/// of the clean run's (`clean`), with the noise of the comparison (each curve's spread over
/// its last evaluations, combined): "held" when even gap + noise is within 1 point, "did not
/// hold" when even gap - noise is beyond it, "within noise" otherwise.
fn robust_verdict(
    honest: f64,
    clean: f64,
    honest_run: &FederatedRun,
    clean_run: &FederatedRun,
) -> String {
    let gap = (clean - honest) * 100.0;
    let curve = |run: &FederatedRun| -> Vec<f64> {
        run.mean_by_round(|r| r.rouge_l)
            .iter()
            .map(|p| p.1)
            .collect()
    };
    let noise = tail_spread(&curve(honest_run))
        .zip(tail_spread(&curve(clean_run)))
        .map(|(h, c)| (h * h + c * c).sqrt() * 100.0);
    let spread = noise.unwrap_or(0.0);
    let outcome = if gap + spread <= 1.0 {
        "held"
    } else if gap - spread > 1.0 {
        "did not hold"
    } else {
        "held within noise"
    };
    format!(
        "**robust aggregation {outcome}**: {:.1} ROUGE-L points {} the clean run{} (goal: within 1 point)",
        gap.abs(),
        if gap >= 0.0 { "below" } else { "above" },
        noise.map_or(" (noise not measured)".to_owned(), |n| format!(
            " ± {n:.1} (the spread of each curve's last {NOISE_POINTS} evaluations, combined)"
        ))
    )
}

fn fmt_opt(value: Option<f64>) -> String {
    value.map_or("n/a".into(), |v| format!("{v:.3}"))
}

fn human(bytes: f64) -> String {
    if bytes >= f64::from(1 << 20) {
        format!("{:.2} MiB", bytes / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// Writes the report of `runs` (the first is the main run, possibly under a scenario) into
/// `dir`; `clean` is the same mesh without the scenario.
pub fn write(
    dir: &Path,
    config: &RunConfig,
    runs: &[FederatedRun],
    clean: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let main = runs.first().context("no federated run to report")?;
    write_data(dir, config, runs, clean, baselines)?;
    let energy = write_charts(dir, config, runs, clean, baselines)?;
    let mut md = String::new();
    summary_header(&mut md, config, main, clean)?;
    quality_table(&mut md, config, runs, clean, baselines)?;
    outer_table(&mut md, runs)?;
    // The goal is about the mesh without faults.
    let fault_free = clean.unwrap_or(main);
    let f32_run = runs
        .iter()
        .find(|r| r.codec == "f32" && r.outer == fault_free.outer);
    if let (Some(f32_run), Some(b)) = (f32_run, baselines)
        && let Some(verdict) = goal_verdict(fault_free, f32_run, b)
    {
        writeln!(md, "{}\n", verdict.sentence())?;
    }
    writeln!(md, "{}\n", frontier_point(fault_free, f32_run, baselines))?;
    energy_lines(&mut md, fault_free)?;
    chart_list(&mut md, energy)?;
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

/// `metrics.json` (every record of every run) and `rounds.csv` (the main run).
fn write_data(
    dir: &Path,
    config: &RunConfig,
    runs: &[FederatedRun],
    clean: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "config": config,
        "runs": runs.iter().chain(clean).map(|r| serde_json::json!({
            "codec": r.codec, "outer": r.outer, "scenario": r.scenario, "faults": r.faults,
            "seconds": r.seconds, "nodes": r.records,
        })).collect::<Vec<_>>(),
        "baselines": baselines.map(|b| serde_json::json!({
            "alone_rouge_l": b.alone, "centralized_rouge_l": b.centralized,
            "centralized_lr": b.centralized_lr, "centralized_tried": b.centralized_tried,
            "steps_per_node": b.steps_per_node, "seconds": b.seconds,
        })),
    });
    std::fs::write(
        dir.join("metrics.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut csv = String::from(
        "node,round,train_loss,eval_loss,rouge_l,deltas,mesh_peers,delta_bytes,raw_delta_bytes,payload_in,wire_in,wire_out,amplification,seconds_train,seconds_total,seconds_eval,tokens,granularity,energy_compute_j,energy_comm_j,tokens_per_s_per_w,deadline_s,utilization,t_comp_s,t_wait_s,t_comm_s\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
    let main = runs.first().context("no federated run to report")?;
    for (node, records) in main.records.iter().enumerate() {
        for r in records {
            writeln!(
                csv,
                "{node},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                r.round,
                opt(r.train_loss),
                opt(r.eval_loss),
                opt(r.rouge_l),
                r.deltas,
                r.mesh_peers,
                r.delta_bytes,
                r.raw_delta_bytes,
                r.payload_in,
                r.wire_in,
                r.wire_out,
                opt(r.amplification),
                r.seconds_train,
                r.seconds_total,
                r.seconds_eval,
                r.tokens,
                opt(r.energy.granularity),
                opt(r.energy.compute_j),
                opt(r.energy.comm_j),
                opt(r.energy.tokens_per_s_per_w),
                r.deadline_s,
                opt(r.timing.utilization),
                opt(r.timing.t_comp_s),
                opt(r.timing.t_wait_s),
                opt(r.timing.t_comm_s)
            )?;
        }
    }
    std::fs::write(dir.join("rounds.csv"), csv)?;
    Ok(())
}

/// The baselines' ROUGE-L curves on the mesh's round axis: each node alone (mean over nodes;
/// `local_steps` steps a round) and centralized (`local_steps x nodes` steps a round).
fn baseline_series(config: &RunConfig, b: &Baselines) -> Vec<Series> {
    let steps_per_round = config.local_steps as f64;
    let mut alone_mean: Vec<(f64, f64)> = Vec::new();
    if let Some(first) = b.alone.first() {
        for (k, (step, _)) in first.iter().enumerate() {
            let values: Vec<f64> = b
                .alone
                .iter()
                .filter_map(|c| c.get(k).map(|p| p.1))
                .collect();
            alone_mean.push((
                *step as f64 / steps_per_round,
                values.iter().sum::<f64>() / values.len().max(1) as f64,
            ));
        }
    }
    let central_per_round = steps_per_round * config.nodes as f64;
    let mut series = vec![Series::new("each node alone (mean)", alone_mean)];
    if !b.centralized.is_empty() {
        series.push(Series::new(
            &format!("centralized (same total steps, lr {})", b.centralized_lr),
            b.centralized
                .iter()
                .map(|(s, v)| (*s as f64 / central_per_round, *v))
                .collect(),
        ));
    }
    series
}

/// Every chart of the report; returns whether the energy chart was drawn (a power reader
/// was readable).
fn write_charts(
    dir: &Path,
    config: &RunConfig,
    runs: &[FederatedRun],
    clean: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> anyhow::Result<bool> {
    let main = runs.first().context("no federated run to report")?;
    let text = |title, y| ChartText {
        title,
        x: "round",
        y,
    };
    let per_node = |value: &dyn Fn(&RoundRecord) -> Option<f64>| -> Vec<Series> {
        main.records
            .iter()
            .enumerate()
            .map(|(i, records)| {
                Series::new(
                    &format!("node {i}"),
                    records
                        .iter()
                        .filter_map(|r| value(r).map(|v| ((r.round + 1) as f64, v)))
                        .collect(),
                )
            })
            .collect()
    };
    chart(
        dir,
        "loss",
        text("Local training loss per round", "token cross-entropy"),
        &per_node(&|r| r.train_loss),
    )?;
    let mut rouge = vec![Series::new(
        &format!("federated ({})", main.label()),
        main.mean_by_round(|r| r.rouge_l),
    )];
    if let Some(clean) = clean {
        rouge.push(Series::new(
            &format!("federated ({}), no `{}`", clean.label(), main.scenario),
            clean.mean_by_round(|r| r.rouge_l),
        ));
    }
    for run in &runs[1..] {
        rouge.push(Series::new(
            &format!("federated ({})", run.label()),
            run.mean_by_round(|r| r.rouge_l),
        ));
    }
    if let Some(b) = baselines {
        rouge.extend(baseline_series(config, b));
    }
    chart(
        dir,
        "rouge",
        text("Eval ROUGE-L per round", "ROUGE-L F"),
        &rouge,
    )?;
    chart(
        dir,
        "bytes",
        text("Bytes sent per node per round (wire)", "KiB"),
        &per_node(&|r| Some(r.wire_out as f64 / 1024.0)),
    )?;
    chart(
        dir,
        "round_time",
        text(
            "Round time: compute vs communication (mean over nodes)",
            "seconds",
        ),
        &[
            Series::new(
                "compute (local training)",
                main.mean_by_round(|r| Some(r.seconds_train)),
            ),
            Series::new(
                "communication + waiting",
                main.mean_by_round(|r| {
                    Some((r.seconds_total - r.seconds_train - r.seconds_eval).max(0.0))
                }),
            ),
            Series::new("evaluation", main.mean_by_round(|r| Some(r.seconds_eval))),
        ],
    )?;
    chart(
        dir,
        "utilization",
        text(
            "Compute utilization: time training / wall time of the round (mean over nodes)",
            "%",
        ),
        &runs
            .iter()
            .map(|run| {
                Series::new(
                    &format!("federated ({})", run.label()),
                    run.mean_by_round(|r| r.timing.utilization.map(|u| 100.0 * u)),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    chart(
        dir,
        "granularity",
        text(
            "Granularity G = compute time / communication time (mean over nodes)",
            "G",
        ),
        &[Series::new(
            &format!("federated ({})", main.codec),
            main.mean_by_round(|r| r.energy.granularity),
        )],
    )?;
    let measured = main
        .records
        .iter()
        .flatten()
        .any(|r| r.energy.compute_j.is_some());
    if measured {
        chart(
            dir,
            "energy",
            text(
                "Energy per round: compute vs communication (mean over nodes)",
                "joules",
            ),
            &[
                Series::new("compute", main.mean_by_round(|r| r.energy.compute_j)),
                Series::new("communication", main.mean_by_round(|r| r.energy.comm_j)),
            ],
        )?;
    }
    Ok(measured)
}

/// The run's settings and, under a scenario, what the scenario did.
fn summary_header(
    md: &mut String,
    config: &RunConfig,
    main: &FederatedRun,
    clean: Option<&FederatedRun>,
) -> anyhow::Result<()> {
    writeln!(md, "# meshtune testnet report\n")?;
    writeln!(
        md,
        "{} nodes ({}{}), {} rounds x {} local steps (batch {}, lr {}), model `{}`, data {}, split `{}`, aggregation `{}`, {} eval examples.\n",
        config.nodes,
        if config.mode == "netns" {
            "each in its own network namespace"
        } else {
            "processes on loopback"
        },
        config
            .link
            .as_deref()
            .map_or(String::new(), |l| format!(", every link shaped as `{l}`")),
        config.rounds,
        config.local_steps,
        config.batch_size,
        config.lr,
        config.model,
        config.data,
        config.split,
        config.aggregation,
        config.eval_examples
    )?;
    if main.scenario == "none" {
        return Ok(());
    }
    writeln!(md, "## Scenario `{}`\n", main.scenario)?;
    for event in &main.faults {
        writeln!(md, "- {event}")?;
    }
    let last_round = config.rounds.saturating_sub(1);
    let finals: Vec<Option<&RoundRecord>> = main
        .records
        .iter()
        .map(|r| r.iter().find(|x| x.round == last_round))
        .collect();
    let finished = finals.iter().flatten().count();
    let mut hashes: Vec<&str> = finals
        .iter()
        .flatten()
        .map(|r| r.model_hash.as_str())
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    writeln!(
        md,
        "- {finished} of {} nodes applied the last round ({last_round}); they hold {} distinct final model(s)",
        main.records.len(),
        hashes.len()
    )?;
    for (i, record) in finals.iter().enumerate() {
        if let Some(peer) = record.and_then(|r| r.adopted_final_state.as_deref()) {
            writeln!(
                md,
                "- node {i} missed part of the last round and adopted the final state most nodes held (from {peer})"
            )?;
        }
    }
    for (i, records) in main.records.iter().enumerate() {
        let rounds: Vec<String> = records
            .iter()
            .map(|r| match &r.synced_from {
                Some(_) => format!("{} (caught up: adopted a peer's state)", r.round),
                None => r.round.to_string(),
            })
            .collect();
        writeln!(md, "- node {i} applied rounds [{}]", rounds.join(", "))?;
    }
    scenario_verdict(md, main, clean, hashes.len())?;
    writeln!(md)?;
    Ok(())
}

fn quality_table(
    md: &mut String,
    config: &RunConfig,
    runs: &[FederatedRun],
    clean: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> anyhow::Result<()> {
    writeln!(md, "## Quality and bytes\n")?;
    writeln!(
        md,
        "| setup | final ROUGE-L | bytes sent per node (wire, whole run) | delta per round (encoded / raw f32) | wall time | compute utilization |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for run in runs.iter().chain(clean) {
        let (encoded, raw) = run.delta_sizes();
        let label = if run.scenario == "none" {
            format!("federated, codec `{}`", run.label())
        } else {
            format!(
                "federated, codec `{}`, scenario `{}`",
                run.label(),
                run.scenario
            )
        };
        writeln!(
            md,
            "| {label} | {} | {} | {} / {} ({:.1}x) | {:.0} s | {} |",
            fmt_opt(run.final_rouge_l()),
            human(run.bytes_sent_per_node()),
            human(encoded),
            human(raw),
            raw / encoded.max(1.0),
            run.seconds,
            run.utilization()
                .map_or("-".into(), |u| format!("{:.0}%", 100.0 * u))
        )?;
    }
    if let Some(b) = baselines {
        writeln!(
            md,
            "| each node alone ({} steps, mean over nodes) | {} | 0 | - | {:.0} s (with centralized) | |",
            b.steps_per_node,
            fmt_opt(b.alone_final()),
            b.seconds
        )?;
        if b.centralized_tried.is_empty() {
            writeln!(md)?;
            return Ok(());
        }
        writeln!(
            md,
            "| centralized on the union ({} steps, lr {}; best of {}) | {} | 0 | - | | |",
            b.steps_per_node * config.nodes,
            b.centralized_lr,
            b.centralized_tried
                .iter()
                .map(|(lr, r)| format!("lr {lr}: {}", fmt_opt(*r)))
                .collect::<Vec<_>>()
                .join(", "),
            fmt_opt(b.centralized_final())
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The outer optimizers compared (same codec, no scenario), when there are several.
fn outer_table(md: &mut String, runs: &[FederatedRun]) -> anyhow::Result<()> {
    let Some(main) = runs.first() else {
        return Ok(());
    };
    let outers: Vec<&FederatedRun> = runs
        .iter()
        .filter(|r| r.codec == main.codec && r.scenario == "none")
        .collect();
    if outers.len() < 2 {
        return Ok(());
    }
    writeln!(
        md,
        "## Outer optimizers (codec `{}`, same data and seeds)\n",
        main.codec
    )?;
    writeln!(
        md,
        "| outer step | final ROUGE-L | wall time |\n|---|---|---|"
    )?;
    for run in &outers {
        writeln!(
            md,
            "| `{}` | {} | {:.0} s |",
            run.outer,
            fmt_opt(run.final_rouge_l()),
            run.seconds
        )?;
    }
    if let Some(best) = outers.iter().max_by(|a, b| {
        let key = |r: &FederatedRun| r.final_rouge_l().unwrap_or(f64::NEG_INFINITY);
        key(a).total_cmp(&key(b))
    }) {
        writeln!(
            md,
            "\nHighest final ROUGE-L on this task: `{}`.\n",
            best.outer
        )?;
    }
    Ok(())
}

/// Evaluations at the end of a curve whose spread estimates its noise.
const NOISE_POINTS: usize = 3;

/// Sample standard deviation of the last [`NOISE_POINTS`] of `values` (`None` with fewer
/// than two).
fn tail_spread(values: &[f64]) -> Option<f64> {
    let tail = &values[values.len().saturating_sub(NOISE_POINTS)..];
    if tail.len() < 2 {
        return None;
    }
    let mean = tail.iter().sum::<f64>() / tail.len() as f64;
    let var = tail.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (tail.len() - 1) as f64;
    Some(var.sqrt())
}

/// The main job's goal: federated within 1 ROUGE-L point of centralized at >= 50x fewer bytes
/// than f32 deltas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoalVerdict {
    /// Federated minus centralized final ROUGE-L, in points.
    pub gap: f64,
    /// The comparison's noise in points: the spread (standard deviation) of each curve's last
    /// evaluations, combined; `None` when a curve has a single evaluation.
    pub noise: Option<f64>,
    /// f32 run's bytes over the main run's.
    pub ratio: f64,
    pub outcome: GoalOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoalOutcome {
    /// Within 1 point even at the low end of the noise, and >= 50x fewer bytes.
    Met,
    /// More than 1 point below even at the high end of the noise, or < 50x fewer bytes.
    NotMet,
    /// The 1-point threshold lies inside gap +- noise: this run cannot tell.
    WithinNoise,
}

/// The goal's verdict, `None` when the federated or centralized run has no evaluation.
pub fn goal_verdict(
    run: &FederatedRun,
    f32_run: &FederatedRun,
    baselines: &Baselines,
) -> Option<GoalVerdict> {
    let central = baselines.centralized_final()?;
    let gap = (run.final_rouge_l()? - central) * 100.0;
    let ratio = f32_run.bytes_sent_per_node() / run.bytes_sent_per_node().max(1.0);
    let federated: Vec<f64> = run
        .mean_by_round(|r| r.rouge_l)
        .iter()
        .map(|p| p.1)
        .collect();
    let centralized: Vec<f64> = baselines.centralized.iter().map(|p| p.1).collect();
    let noise = tail_spread(&federated)
        .zip(tail_spread(&centralized))
        .map(|(f, c)| (f * f + c * c).sqrt() * 100.0);
    let spread = noise.unwrap_or(0.0);
    let outcome = if ratio < 50.0 || gap + spread < -1.0 {
        GoalOutcome::NotMet
    } else if gap - spread >= -1.0 {
        GoalOutcome::Met
    } else {
        GoalOutcome::WithinNoise
    };
    Some(GoalVerdict {
        gap,
        noise,
        ratio,
        outcome,
    })
}

impl GoalVerdict {
    pub fn sentence(&self) -> String {
        let position = if self.gap >= 0.0 {
            format!("{:.1} ROUGE-L points above centralized", self.gap)
        } else {
            format!("{:.1} ROUGE-L points below centralized", -self.gap)
        };
        let noise = match self.noise {
            Some(n) => format!(
                " (± {n:.1} points: the spread of each curve's last {NOISE_POINTS} evaluations, combined)"
            ),
            None => " (noise not measured: a curve has a single evaluation)".to_owned(),
        };
        let outcome = match self.outcome {
            GoalOutcome::Met => "goal met".to_owned(),
            GoalOutcome::NotMet => "goal not met".to_owned(),
            GoalOutcome::WithinNoise => "within noise: the 1-point threshold lies inside the \
                 spread, so this run neither meets nor misses the goal (more --eval-examples or \
                 several --seed runs narrow it)"
                .to_owned(),
        };
        format!(
            "Goal: federated within 1 ROUGE-L point of centralized at >= 50x fewer bytes than f32 \
             deltas. Measured: {position}{noise}, {:.1}x fewer bytes on the wire than the f32 \
             run: {outcome}.",
            self.ratio
        )
    }
}

/// Where this run sits on the compression frontier (`meshtune-testnet frontier`): bytes per
/// node per round and final ROUGE-L against the f32 mesh and each node alone, said to be one
/// run (its gaps are within the seed-to-seed spread of a few points).
pub fn frontier_point(
    run: &FederatedRun,
    f32_run: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> String {
    let (encoded, raw) = run.delta_sizes();
    let rouge = run.final_rouge_l().map(|r| 100.0 * r);
    let gap = |other: Option<f64>, name: &str| match (rouge, other) {
        (Some(a), Some(b)) => format!(", {:+.1} points against {name}", a - 100.0 * b),
        _ => String::new(),
    };
    format!(
        "Frontier point: `{}` sends {} per node per round ({:.0}x fewer than f32), final ROUGE-L \
         {}{}{}. One run with one seed: a gap of a point or two is within the seed-to-seed \
         spread; `meshtune-testnet frontier` measures it over 3 seeds with the spread.",
        run.label(),
        human(encoded),
        raw / encoded.max(1.0),
        rouge.map_or("-".into(), |r| format!("{r:.1}")),
        gap(
            f32_run.and_then(FederatedRun::final_rouge_l),
            "the f32 mesh"
        ),
        gap(
            baselines.and_then(Baselines::alone_final),
            "each node alone"
        ),
    )
}

fn energy_lines(md: &mut String, main: &FederatedRun) -> anyhow::Result<()> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let granularity = median(
        main.records
            .iter()
            .flatten()
            .filter_map(|r| r.energy.granularity)
            .collect(),
    );
    let efficiency = median(
        main.records
            .iter()
            .flatten()
            .filter_map(|r| r.energy.tokens_per_s_per_w)
            .collect(),
    );
    let utilization = median(
        main.records
            .iter()
            .flatten()
            .filter_map(|r| r.timing.utilization)
            .collect(),
    );
    writeln!(
        md,
        "Compute utilization (time training / wall time, median over node-rounds): {}. \
         Granularity G = T_comp / T_comm (median over node-rounds): {}. Energy: {}.\n",
        utilization.map_or("-".into(), |u| format!("{:.0}%", 100.0 * u)),
        granularity.map_or("-".into(), |g| format!("{g:.2}")),
        match efficiency {
            Some(e) => format!(
                "{e:.1} training tokens/s/W (median; the power reader measures the whole \
                 device, shared by every node on it)"
            ),
            None =>
                "unavailable (no readable power reader here: see `meshtune node --power`)".into(),
        }
    )?;
    Ok(())
}

fn chart_list(md: &mut String, energy: bool) -> anyhow::Result<()> {
    writeln!(md, "## Charts\n")?;
    let energy_chart = energy.then_some(("energy", "energy per round, compute vs communication"));
    for (name, what) in [
        (
            "rouge",
            "eval ROUGE-L per round, federated vs alone vs centralized",
        ),
        ("loss", "local training loss per node"),
        ("bytes", "bytes sent per node per round"),
        (
            "round_time",
            "round time split into compute, communication and evaluation",
        ),
        (
            "utilization",
            "compute utilization per round (time training / wall time)",
        ),
        ("granularity", "granularity G = T_comp / T_comm per round"),
    ]
    .into_iter()
    .chain(energy_chart)
    {
        writeln!(md, "- {what}: ![{name}]({name}.png) ([svg]({name}.svg))")?;
    }
    writeln!(
        md,
        "\nData: `metrics.json` (every record of every run), `rounds.csv` (main run)."
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::PLOT_HEIGHT as PLOT_HEIGHT_FOR_TESTS;

    /// A made-up round record: `rouge` evaluated this round, `sent` bytes on the wire.
    fn record(node: usize, round: u64, rouge: Option<f64>, sent: u64) -> RoundRecord {
        serde_json::from_value(serde_json::json!({
            "round": round, "peer_id": format!("p{node}"), "train_loss": 2.0 - 0.1 * round as f64,
            "train_samples": 16, "eval_loss": null, "rouge_l": rouge, "deltas": 2,
            "mesh_peers": 1, "delta_bytes": sent, "raw_delta_bytes": 4000, "payload_in": sent,
            "wire_in": sent, "wire_out": sent, "amplification": 1.0, "seconds_train": 1.5,
            "seconds_total": 2.0, "seconds_eval": 0.2, "tokens": 900, "granularity": 3.0,
            "utilization": 0.75, "t_comp_s": 1.5, "t_wait_s": 0.5, "t_comm_s": 0.3,
            "model_hash": format!("h{round}"), "rejected": {}
        }))
        .expect("record")
    }

    /// Two nodes, 10 rounds, evaluated every round along `rouge` (one value per round).
    fn run(codec: &str, rouge: &[f64], sent: u64) -> FederatedRun {
        FederatedRun {
            codec: codec.into(),
            outer: "average".into(),
            overlap: false,
            records: (0..2)
                .map(|node| {
                    rouge
                        .iter()
                        .enumerate()
                        .map(|(round, r)| record(node, round as u64, Some(*r), sent))
                        .collect()
                })
                .collect(),
            seconds: 40.0,
            scenario: "none".into(),
            faults: Vec::new(),
        }
    }

    fn config() -> RunConfig {
        RunConfig {
            nodes: 2,
            rounds: 10,
            local_steps: 4,
            codec: "top2%+int8/64+zstd:1".into(),
            aggregation: "mean".into(),
            split: "iid".into(),
            model: "tiny".into(),
            data: "made up".into(),
            batch_size: 4,
            lr: 3e-3,
            seed: 1,
            mode: "process".into(),
            link: None,
            eval_examples: 24,
        }
    }

    fn baselines(central: &[f64]) -> Baselines {
        let curve = |values: &[f64], per_round: usize| -> Vec<(usize, f64)> {
            values
                .iter()
                .enumerate()
                .map(|(k, v)| ((k + 1) * per_round, *v))
                .collect()
        };
        Baselines {
            alone: vec![curve(&[0.1, 0.2, 0.25], 12), curve(&[0.1, 0.15, 0.2], 12)],
            centralized: curve(central, 8),
            centralized_lr: 3e-3,
            centralized_tried: vec![(3e-3, central.last().copied()), (1e-3, Some(0.1))],
            steps_per_node: 40,
            seconds: 30.0,
        }
    }

    fn flat(end: f64) -> Vec<f64> {
        (0..10).map(|r| end * (r + 1).min(7) as f64 / 7.0).collect()
    }

    fn summary(runs: &[FederatedRun], baselines: Option<&Baselines>) -> String {
        let dir = tempfile::tempdir().expect("tmp");
        write(dir.path(), &config(), runs, None, baselines).expect("report");
        for name in [
            "loss",
            "rouge",
            "bytes",
            "round_time",
            "utilization",
            "granularity",
        ] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{name}.svg")))
                .expect("svg written");
            assert!(svg.starts_with("<svg"), "{name}");
        }
        std::fs::read_to_string(dir.path().join("summary.md")).expect("summary")
    }

    #[test]
    fn the_goal_is_met_when_the_gap_and_its_noise_clear_one_point_at_50x_fewer_bytes() {
        // Federated ends 0.3 points above centralized; both curves flat at the end.
        let runs = [
            run("top2%", &flat(0.303), 1_000),
            run("f32", &flat(0.303), 90_000),
        ];
        let text = summary(&runs, Some(&baselines(&[0.2, 0.3, 0.3, 0.3, 0.3])));
        assert!(
            text.contains("0.3 ROUGE-L points above centralized (± 0.0 points"),
            "{text}"
        );
        assert!(text.contains("90.0x fewer bytes"), "{text}");
        assert!(text.contains(": goal met."), "{text}");
        // The frontier point: bytes per node per round and the gaps, as one run.
        assert!(
            text.contains("Frontier point: `top2%` sends")
                && text.contains("final ROUGE-L 30.3, +0.0 points against the f32 mesh")
                && text.contains("One run with one seed"),
            "{text}"
        );
    }

    #[test]
    fn the_goal_is_not_met_below_the_noise_or_under_50x_fewer_bytes() {
        let below = [
            run("top2%", &flat(0.25), 1_000),
            run("f32", &flat(0.25), 90_000),
        ];
        let text = summary(&below, Some(&baselines(&[0.2, 0.3, 0.3, 0.3, 0.3])));
        assert!(
            text.contains("5.0 ROUGE-L points below centralized"),
            "{text}"
        );
        assert!(text.contains(": goal not met."), "{text}");
        // Quality fine, but only 10x fewer bytes.
        let bytes = [
            run("top2%", &flat(0.3), 9_000),
            run("f32", &flat(0.3), 90_000),
        ];
        let text = summary(&bytes, Some(&baselines(&[0.2, 0.3, 0.3, 0.3, 0.3])));
        assert!(text.contains("10.0x fewer bytes"), "{text}");
        assert!(text.contains(": goal not met."), "{text}");
    }

    #[test]
    fn a_gap_whose_noise_straddles_the_threshold_is_reported_as_within_noise() {
        // Centralized ends on 0.30, 0.32, 0.28 (spread 2 points): federated 1.5 below its
        // last value cannot be told apart from the 1-point threshold.
        let runs = [
            run("top2%", &flat(0.265), 1_000),
            run("f32", &flat(0.265), 90_000),
        ];
        let b = baselines(&[0.2, 0.3, 0.3, 0.32, 0.28]);
        let text = summary(&runs, Some(&b));
        assert!(
            text.contains("1.5 ROUGE-L points below centralized (± 2.0"),
            "{text}"
        );
        assert!(text.contains("within noise"), "{text}");
        let verdict = goal_verdict(&runs[0], &runs[1], &b).expect("verdict");
        assert_eq!(verdict.outcome, GoalOutcome::WithinNoise);
        assert!((verdict.noise.expect("noise") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn missing_data_gives_no_verdict_and_says_so() {
        let runs = [
            run("top2%", &flat(0.3), 1_000),
            run("f32", &flat(0.3), 90_000),
        ];
        // No baselines (--no-compare): no goal line at all, and the table has no baseline rows.
        let text = summary(&runs, None);
        assert!(!text.contains("Goal:"), "{text}");
        assert!(!text.contains("centralized on the union"), "{text}");
        // Baselines without any evaluation, and no f32 run: no verdict either.
        let mut empty = baselines(&[]);
        empty.alone = vec![Vec::new(), Vec::new()];
        let text = summary(&runs, Some(&empty));
        assert!(!text.contains("Goal:"), "{text}");
        assert!(text.contains("| n/a |"), "{text}");
        let text = summary(&runs[..1], Some(&baselines(&[0.3])));
        assert!(!text.contains("Goal:"), "{text}");
        // A single evaluation each: the verdict says the noise was not measured.
        let single = [run("top2%", &[0.3], 1_000), run("f32", &[0.3], 90_000)];
        let text = summary(&single, Some(&baselines(&[0.3])));
        assert!(text.contains("noise not measured"), "{text}");
        assert!(text.contains(": goal met."), "{text}");
    }

    /// Every `<text>` of an SVG: (x, y, content).
    fn texts(svg: &str) -> Vec<(f64, f64, String)> {
        let attr = |tag: &str, name: &str| -> f64 {
            let start = tag.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
            let end = start + tag[start..].find('"').expect("quote");
            tag[start..end].parse().expect("number")
        };
        svg.split("<text")
            .skip(1)
            .map(|part| {
                let (tag, rest) = part.split_once('>').expect("tag");
                let content = rest.split("</text>").next().expect("content");
                (attr(tag, "x"), attr(tag, "y"), content.trim().to_owned())
            })
            .collect()
    }

    /// Each chart rendered from made-up runs: rounds ticked in whole numbers from 0, values
    /// ticked at round steps from 0, the legend under the plot area, and a PNG beside it.
    #[test]
    fn every_chart_has_whole_round_ticks_round_value_ticks_and_a_legend_below_the_plot() {
        let dir = tempfile::tempdir().expect("tmp");
        let runs = [
            run("top2%", &flat(0.303), 1_000),
            run("f32", &flat(0.303), 90_000),
        ];
        let b = baselines(&[0.2, 0.3, 0.3, 0.3, 0.3]);
        write(dir.path(), &config(), &runs, None, Some(&b)).expect("report");
        for (name, legend) in [
            ("rouge", "centralized (same total steps, lr 0.003)"),
            ("loss", "node 1"),
            ("bytes", "node 0"),
            ("round_time", "communication + waiting"),
            ("utilization", "federated (top2%)"),
            ("granularity", "federated (top2%)"),
        ] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{name}.svg"))).expect("svg");
            let texts = texts(&svg);
            let labels: Vec<&str> = texts.iter().map(|t| t.2.as_str()).collect();
            // x: 0, 1, ..., 10 (10 rounds), never 5.750.
            for round in 0..=10 {
                assert!(
                    labels.contains(&round.to_string().as_str()),
                    "{name}: {labels:?}"
                );
            }
            let numbers: Vec<f64> = labels.iter().filter_map(|l| l.parse().ok()).collect();
            assert!(
                numbers.contains(&0.0),
                "{name}: an axis from zero: {labels:?}"
            );
            for n in &numbers {
                // Round values: at most 3 significant digits (0.05, 0.3, 2000), no 0.246.
                let digits: String = format!("{n}")
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                let significant = digits.trim_start_matches('0').trim_end_matches('0');
                assert!(significant.len() <= 2, "{name}: tick {n} in {labels:?}");
            }
            let (_, y, _) = texts.iter().find(|t| t.2 == legend).expect(legend);
            assert!(
                *y > f64::from(PLOT_HEIGHT_FOR_TESTS),
                "{name}: legend inside the plot"
            );
            let png = std::fs::read(dir.path().join(format!("{name}.png"))).expect("png");
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        }
        // Bytes in KiB: 1000 B a round is under 1 KiB, so the axis ends at 1.
        let svg = std::fs::read_to_string(dir.path().join("bytes.svg")).expect("svg");
        assert!(texts(&svg).iter().any(|t| t.2 == "KiB"));
    }

    #[test]
    fn the_byzantine_verdict_weighs_the_gap_against_the_noise() {
        let steady = run("top2%", &flat(0.40), 1_000);
        let clean = run("top2%", &flat(0.404), 1_000);
        let text = robust_verdict(0.40, 0.404, &steady, &clean);
        assert!(
            text.starts_with("**robust aggregation held**: 0.4 ROUGE-L points below"),
            "{text}"
        );
        // 3 points below a flat clean run: did not hold.
        let text = robust_verdict(0.37, 0.40, &steady, &clean);
        assert!(
            text.starts_with("**robust aggregation did not hold**: 3.0"),
            "{text}"
        );
        // The same gap with the honest curve ending 0.33, 0.41, 0.37 (4 points of spread).
        let mut values = flat(0.37);
        values[7..].copy_from_slice(&[0.33, 0.41, 0.37]);
        let noisy = run("top2%", &values, 1_000);
        let text = robust_verdict(0.37, 0.40, &noisy, &clean);
        assert!(
            text.starts_with("**robust aggregation held within noise**: 3.0"),
            "{text}"
        );
        assert!(text.contains("± 4.0"), "{text}");
    }
}
