//! `meshtune rouge`: mean ROUGE F-measures of predictions against references, one example per
//! line, equal to Google's `rouge-score` with `use_stemmer=True`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use meshtune_model::rouge::mean_f_scores;

#[derive(Debug, Args)]
pub struct RougeArgs {
    /// Predictions, one example per line.
    #[arg(long)]
    pub predictions: PathBuf,
    /// References, one example per line (same count as predictions).
    #[arg(long)]
    pub references: PathBuf,
    /// Print {"rouge1":F,"rouge2":F,"rougeL":F,"rougeLsum":F}.
    #[arg(long)]
    pub json: bool,
}

fn read_lines(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().map(str::to_string).collect())
}

pub fn run(args: RougeArgs) -> anyhow::Result<()> {
    let predictions = read_lines(&args.predictions)?;
    let references = read_lines(&args.references)?;
    if predictions.len() != references.len() {
        anyhow::bail!(
            "{} has {} lines but {} has {}: one example per line in both",
            args.predictions.display(),
            predictions.len(),
            args.references.display(),
            references.len()
        );
    }
    if predictions.is_empty() {
        anyhow::bail!("{} has no examples", args.predictions.display());
    }
    let scores = mean_f_scores(
        predictions
            .iter()
            .map(String::as_str)
            .zip(references.iter().map(String::as_str)),
    );
    if args.json {
        println!("{}", serde_json::to_string(&scores)?);
    } else {
        println!("examples   {}", predictions.len());
        println!("ROUGE-1    {:.4}", scores.rouge1);
        println!("ROUGE-2    {:.4}", scores.rouge2);
        println!("ROUGE-L    {:.4}", scores.rouge_l);
        println!("ROUGE-Lsum {:.4}", scores.rouge_lsum);
    }
    Ok(())
}
