//! The testnet report: every node's round records as JSON and CSV, charts (SVG and PNG) of
//! loss, ROUGE-L, bytes and round time, and `summary.md` comparing federated training with
//! each node alone, centralized training and other codecs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use meshtune_node::coordinator::RoundRecord;
use meshtune_node::plot::{Series, line_chart_svg};

use crate::local::TestnetArgs;
use crate::png::write_png;

/// One federated run: the records of every node.
#[derive(Debug, Clone)]
pub struct FederatedRun {
    pub codec: String,
    /// `--outer` of this run.
    pub outer: String,
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
        if self.outer == "average" {
            self.codec.clone()
        } else {
            format!("{}, outer {}", self.codec, self.outer)
        }
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

fn chart(
    dir: &Path,
    name: &str,
    title: &str,
    x: &str,
    y: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let svg = line_chart_svg(title, x, y, series);
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
            if let (Some(h), Some(c)) = (honest, clean_rouge) {
                let gap = (c - h) * 100.0;
                writeln!(
                    md,
                    "- **robust aggregation {}**: {:.1} ROUGE-L points {} the clean run (goal: within 1 point)",
                    if gap <= 1.0 { "held" } else { "did not hold" },
                    gap.abs(),
                    if gap >= 0.0 { "below" } else { "above" }
                )?;
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
    args: &TestnetArgs,
    runs: &[FederatedRun],
    clean: Option<&FederatedRun>,
    baselines: Option<&Baselines>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let main = runs.first().context("no federated run to report")?;

    // Data: JSON (all runs) and CSV (main run).
    let json = serde_json::json!({
        "config": {
            "nodes": args.nodes, "rounds": args.rounds, "local_steps": args.local_steps,
            "codec": args.codec, "aggregation": args.aggregation, "split": args.split,
            "preset": args.preset, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        },
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
        "node,round,train_loss,eval_loss,rouge_l,deltas,mesh_peers,delta_bytes,raw_delta_bytes,payload_in,wire_in,wire_out,amplification,seconds_train,seconds_total,seconds_eval,tokens,granularity,energy_compute_j,energy_comm_j,tokens_per_s_per_w,deadline_s\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
    for (node, records) in main.records.iter().enumerate() {
        for r in records {
            writeln!(
                csv,
                "{node},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
                r.deadline_s
            )?;
        }
    }
    std::fs::write(dir.join("rounds.csv"), csv)?;

    // Charts.
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
        "Local training loss per round",
        "round",
        "token cross-entropy",
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
        let steps_per_round = args.local_steps as f64;
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
        rouge.push(Series::new("each node alone (mean)", alone_mean));
        let central_per_round = steps_per_round * args.nodes as f64;
        rouge.push(Series::new(
            &format!("centralized (same total steps, lr {})", b.centralized_lr),
            b.centralized
                .iter()
                .map(|(s, v)| (*s as f64 / central_per_round, *v))
                .collect(),
        ));
    }
    chart(
        dir,
        "rouge",
        "Eval ROUGE-L per round",
        "round",
        "ROUGE-L F",
        &rouge,
    )?;
    chart(
        dir,
        "bytes",
        "Bytes sent per node per round (wire)",
        "round",
        "bytes",
        &per_node(&|r| Some(r.wire_out as f64)),
    )?;
    chart(
        dir,
        "round_time",
        "Round time: compute vs communication (mean over nodes)",
        "round",
        "seconds",
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
        "granularity",
        "Granularity G = compute time / communication time (mean over nodes)",
        "round",
        "G",
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
            "Energy per round: compute vs communication (mean over nodes)",
            "round",
            "joules",
            &[
                Series::new("compute", main.mean_by_round(|r| r.energy.compute_j)),
                Series::new("communication", main.mean_by_round(|r| r.energy.comm_j)),
            ],
        )?;
    }

    // Summary.
    let mut md = String::new();
    writeln!(md, "# meshtune testnet report\n")?;
    writeln!(
        md,
        "{} nodes ({}{}), {} rounds x {} local steps (batch {}, lr {}), model `{}`, data split `{}`, aggregation `{}`.\n",
        args.nodes,
        if args.mode == "netns" {
            "each in its own network namespace"
        } else {
            "processes on loopback"
        },
        args.link
            .as_deref()
            .map_or(String::new(), |l| format!(", every link shaped as `{l}`")),
        args.rounds,
        args.local_steps,
        args.batch_size,
        args.lr,
        args.preset,
        args.split,
        args.aggregation
    )?;
    if main.scenario != "none" {
        writeln!(md, "## Scenario `{}`\n", main.scenario)?;
        for event in &main.faults {
            writeln!(md, "- {event}")?;
        }
        let last_round = args.rounds.saturating_sub(1);
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
        scenario_verdict(&mut md, main, clean, hashes.len())?;
        writeln!(md)?;
    }
    writeln!(md, "## Quality and bytes\n")?;
    writeln!(
        md,
        "| setup | final ROUGE-L | bytes sent per node (wire, whole run) | delta per round (encoded / raw f32) | wall time |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
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
            "| {label} | {} | {} | {} / {} ({:.1}x) | {:.0} s |",
            fmt_opt(run.final_rouge_l()),
            human(run.bytes_sent_per_node()),
            human(encoded),
            human(raw),
            raw / encoded.max(1.0),
            run.seconds
        )?;
    }
    if let Some(b) = baselines {
        writeln!(
            md,
            "| each node alone ({} steps, mean over nodes) | {} | 0 | - | {:.0} s (with centralized) |",
            b.steps_per_node,
            fmt_opt(b.alone_final()),
            b.seconds
        )?;
        writeln!(
            md,
            "| centralized on the union ({} steps, lr {}; best of {}) | {} | 0 | - | |",
            b.steps_per_node * args.nodes,
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
    let outers: Vec<&FederatedRun> = runs
        .iter()
        .filter(|r| r.codec == main.codec && r.scenario == "none")
        .collect();
    if outers.len() > 1 {
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
    }
    // The goal is about the mesh without faults.
    let main = clean.unwrap_or(main);
    let f32_run = runs
        .iter()
        .find(|r| r.codec == "f32" && r.outer == main.outer);
    if let (Some(f32_run), Some(central)) =
        (f32_run, baselines.and_then(Baselines::centralized_final))
    {
        let ratio = f32_run.bytes_sent_per_node() / main.bytes_sent_per_node().max(1.0);
        let gap = main.final_rouge_l().map(|r| (r - central) * 100.0);
        let position = gap.map_or("n/a".into(), |g| {
            if g >= 0.0 {
                format!("{g:.1} ROUGE-L points above centralized")
            } else {
                format!("{:.1} ROUGE-L points below centralized", -g)
            }
        });
        let met = gap.is_some_and(|g| g >= -1.0) && ratio >= 50.0;
        writeln!(
            md,
            "Goal: federated within 1 ROUGE-L point of centralized at >= 50x fewer bytes than f32 deltas. \
             Measured: {position}, {ratio:.1}x fewer bytes on the wire than the f32 run: goal {}.\n",
            if met { "met" } else { "not met" }
        )?;
    }
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
    writeln!(
        md,
        "Granularity G = T_comp / T_comm (median over node-rounds): {}. Energy: {}.\n",
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
    writeln!(md, "## Charts\n")?;
    let energy_chart = measured.then_some(("energy", "energy per round, compute vs communication"));
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
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}
