//! What a testnet trains: the bundled task (the tiny config and the synthetic corpus, or a
//! preset with random weights) or the user's own model folder and Samsum-format data.
//!
//! Owns: checking the flags against each other and against the files, the shards, the eval
//! file, the union the centralized baseline trains on, the model flags every node and baseline
//! gets, and the `[train]` table they share. Must not touch: processes or the report.

use std::path::{Path, PathBuf};

use clap::Args;
use meshtune_model::data::{SamsumRecord, load_samsum};
use meshtune_model::split::{SplitStrategy, split_records};
use meshtune_model::synthetic::{embedded, to_jsonl};

/// Flags for training on your own model and data (all optional: without them the testnet
/// runs the bundled task).
#[derive(Debug, Clone, Default, Args)]
pub struct TaskArgs {
    /// Hugging Face T5 folder: `config.json` and weights (`model.safetensors` or a sharded
    /// index), or `config.json` alone with `--random-init`.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Start `--model` from random weights (only its `config.json` is read).
    #[arg(long, requires = "model")]
    pub random_init: bool,
    /// `tokenizer.json` (default: the one in `--model`, or the bundled one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training data, Samsum JSONL or the HF datasets JSON export (`id`, `dialogue`,
    /// `summary`), split across the nodes with `--split`.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Held-out data in the same format (default: the last `--eval-examples` records of
    /// `--train`, at most a quarter of it, kept out of training).
    #[arg(long, requires = "train")]
    pub eval: Option<PathBuf>,
    /// Text put before every dialogue (default: the train config's, `summarize: `).
    #[arg(long)]
    pub prefix: Option<String>,
    /// A `train.toml` (the settings of `meshtune train --config`, or a node config with a
    /// `[train]` table) given to every node and baseline; its settings win over the
    /// testnet's (`--batch-size`, `--lr`, ...).
    #[arg(long)]
    pub train_config: Option<PathBuf>,
    /// Train LoRA adapters (the train config's `[lora]` settings): nodes exchange only them.
    #[arg(long)]
    pub lora: bool,
}

/// A flag combination or file the testnet cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "--model {0}: no config.json in that folder (a Hugging Face T5 folder has config.json, \
         weights and tokenizer.json)"
    )]
    NoConfig(PathBuf),
    #[error(
        "--model {0}: no weights (model.safetensors or model.safetensors.index.json); add \
         --random-init to start from random weights"
    )]
    NoWeights(PathBuf),
    #[error(
        "--preset {0} has random weights and no tokenizer of its own with --train: pass --tokenizer"
    )]
    PresetWithoutTokenizer(String),
    #[error("{flag} {}: {reason}", path.display())]
    Data {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "--train {}: {examples} training examples (after {held_out} held out for evaluation) \
         for {nodes} nodes: every node needs at least one",
        path.display()
    )]
    TooFew {
        path: PathBuf,
        examples: usize,
        held_out: usize,
        nodes: usize,
    },
    #[error("--split {split} gave node {node} no examples: use --split iid or more data")]
    EmptyShard { split: String, node: usize },
    #[error("--train-config {}: {reason}", path.display())]
    TrainConfig { path: PathBuf, reason: String },
    #[error("the model and tokenizer do not fit together: {0}")]
    Model(String),
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The testnet's own settings that shape the task (from its flags).
#[derive(Debug, Clone)]
pub struct TaskDefaults {
    pub nodes: usize,
    pub split: SplitStrategy,
    pub split_text: String,
    pub seed: u64,
    /// Bundled corpus only: training examples per node.
    pub examples_per_node: usize,
    pub eval_examples: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub preset: String,
}

/// The files and flags of a prepared task.
#[derive(Debug, Clone)]
pub struct Task {
    pub shards: Vec<PathBuf>,
    pub union: PathBuf,
    pub eval: PathBuf,
    /// `--model ...`/`--preset ...`, `--tokenizer`, `--random-init`, `--lora`: for every node
    /// and baseline.
    pub model_args: Vec<String>,
    /// The `[train]` settings every node and baseline gets.
    pub train: toml::Table,
    /// For the report: the model and the data.
    pub model_label: String,
    pub data_label: String,
}

impl Task {
    /// The learning rate in force (the train config's, else `--lr`).
    pub fn lr(&self) -> f64 {
        self.train.get("lr").and_then(toml_f64).unwrap_or(0.0)
    }

    /// The batch size in force.
    pub fn batch_size(&self) -> usize {
        self.train
            .get("batch_size")
            .and_then(toml::Value::as_integer)
            .map_or(0, |b| b as usize)
    }
}

fn toml_f64(value: &toml::Value) -> Option<f64> {
    value
        .as_float()
        .or_else(|| value.as_integer().map(|i| i as f64))
}

fn write_records(path: &Path, records: &[SamsumRecord]) -> Result<(), TaskError> {
    let io = |source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = to_jsonl(records).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    std::fs::write(path, text).map_err(io)
}

fn load(flag: &'static str, path: &Path) -> Result<Vec<SamsumRecord>, TaskError> {
    load_samsum(path).map_err(|err| TaskError::Data {
        flag,
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// Checks the model flags and returns the flags nodes and baselines get, and a label.
fn model_args(
    task: &TaskArgs,
    defaults: &TaskDefaults,
    bundle: &Path,
) -> Result<(Vec<String>, String), TaskError> {
    let path = |p: &Path| p.display().to_string();
    let mut args = Vec::new();
    let label = if let Some(dir) = &task.model {
        if !dir.join("config.json").is_file() {
            return Err(TaskError::NoConfig(dir.clone()));
        }
        let weights = ["model.safetensors", "model.safetensors.index.json"]
            .iter()
            .any(|f| dir.join(f).is_file());
        if !weights && !task.random_init {
            return Err(TaskError::NoWeights(dir.clone()));
        }
        args.extend(["--model".to_owned(), path(dir)]);
        if task.random_init {
            args.push("--random-init".into());
        }
        path(dir)
    } else if defaults.preset == "tiny" {
        args.extend(["--model".to_owned(), path(bundle), "--random-init".into()]);
        "tiny".to_owned()
    } else {
        if task.train.is_some() && task.tokenizer.is_none() {
            return Err(TaskError::PresetWithoutTokenizer(defaults.preset.clone()));
        }
        args.extend(["--preset".to_owned(), defaults.preset.clone()]);
        if task.tokenizer.is_none() {
            args.extend([
                "--tokenizer".to_owned(),
                path(&bundle.join("tokenizer.json")),
            ]);
        }
        defaults.preset.clone()
    };
    if let Some(tokenizer) = &task.tokenizer {
        args.extend(["--tokenizer".to_owned(), path(tokenizer)]);
    }
    // The same check every node makes at start, made once here with a clear message.
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| PathBuf::from(&args[i + 1]))
    };
    let preset = args
        .iter()
        .position(|a| a == "--preset")
        .map(|i| args[i + 1].clone());
    meshtune_node::trainer::model::model_config_and_tokenizer(
        flag("--model").as_deref(),
        preset.as_deref(),
        flag("--tokenizer").as_deref(),
    )
    .map_err(|e| TaskError::Model(format!("{e:#}")))?;
    if task.lora {
        args.push("--lora".into());
    }
    Ok((args, label))
}

/// The `[train]` table: the testnet's settings, overridden by `--train-config`, then
/// `--prefix`; checked as `meshtune train` would check it.
fn train_table(task: &TaskArgs, defaults: &TaskDefaults) -> Result<toml::Table, TaskError> {
    let mut table: toml::Table = toml::from_str(&format!(
        "batch_size = {}\nlr = {:?}\nwarmup_steps = 0\nschedule = \"constant\"\nseed = {}\n\
         source_max_len = 96\ntarget_max_len = 32\neval_examples = {}\neval_max_new_tokens = 32\n",
        defaults.batch_size, defaults.lr, defaults.seed, defaults.eval_examples
    ))
    .map_err(|e| TaskError::Model(e.to_string()))?;
    if let Some(path) = &task.train_config {
        let bad = |reason: String| TaskError::TrainConfig {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut user: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(toml::Value::Table(train)) = user.remove("train") {
            user = train;
        }
        table.extend(user);
    }
    if let Some(prefix) = &task.prefix {
        table.insert("prefix".into(), toml::Value::String(prefix.clone()));
    }
    let text = toml::to_string(&table).map_err(|e| TaskError::Model(e.to_string()))?;
    let checked: meshtune_node::trainer::TrainConfig =
        toml::from_str(&text).map_err(|e| match &task.train_config {
            Some(path) => TaskError::TrainConfig {
                path: path.clone(),
                reason: e.to_string(),
            },
            None => TaskError::Model(e.to_string()),
        })?;
    checked.validate().map_err(|e| TaskError::TrainConfig {
        path: task.train_config.clone().unwrap_or_default(),
        reason: format!("{e:#}"),
    })?;
    Ok(table)
}

/// Training and eval records: the user's files, or the bundled corpus.
fn records(
    task: &TaskArgs,
    defaults: &TaskDefaults,
    bundle: &Path,
) -> Result<(Vec<SamsumRecord>, Vec<SamsumRecord>, String), TaskError> {
    let Some(train_path) = &task.train else {
        let bundled = |e: meshtune_model::synthetic::SyntheticError| TaskError::Data {
            flag: "(bundled corpus)",
            path: bundle.to_path_buf(),
            reason: e.to_string(),
        };
        let all = embedded::train_records().map_err(bundled)?;
        let wanted = (defaults.examples_per_node * defaults.nodes).min(all.len());
        let eval = load("(bundled eval)", &bundle.join("eval.jsonl"))?;
        return Ok((
            all[..wanted].to_vec(),
            eval,
            "the bundled synthetic corpus".into(),
        ));
    };
    let mut train = load("--train", train_path)?;
    let (eval, held_out) = match &task.eval {
        Some(path) => (load("--eval", path)?, 0),
        None => {
            let held_out = defaults.eval_examples.min(train.len() / 4).max(1);
            let eval = train.split_off(train.len().saturating_sub(held_out));
            (eval, held_out)
        }
    };
    if train.len() < defaults.nodes {
        return Err(TaskError::TooFew {
            path: train_path.clone(),
            examples: train.len(),
            held_out,
            nodes: defaults.nodes,
        });
    }
    let label = match &task.eval {
        Some(eval) => format!(
            "`{}` ({} training examples), eval `{}`",
            train_path.display(),
            train.len(),
            eval.display()
        ),
        None => format!(
            "`{}` ({} training examples; its last {held_out} held out for eval)",
            train_path.display(),
            train.len()
        ),
    };
    Ok((train, eval, label))
}

/// Writes the task's files into `data` and returns them with the flags to run it.
pub fn prepare(task: &TaskArgs, defaults: &TaskDefaults, data: &Path) -> Result<Task, TaskError> {
    let io = |source| TaskError::Io {
        path: data.to_path_buf(),
        source,
    };
    // The bundle (tiny config, tokenizer, eval set) is written either way: cheap, and the
    // bundled model flags point at it.
    embedded::write_to(data).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let (model_args, model_label) = model_args(task, defaults, data)?;
    let train = train_table(task, defaults)?;
    let (records, eval_records, data_label) = records(task, defaults, data)?;
    let shards =
        split_records(&records, defaults.nodes, &defaults.split, defaults.seed).map_err(|e| {
            TaskError::Data {
                flag: "--train",
                path: task.train.clone().unwrap_or_default(),
                reason: e.to_string(),
            }
        })?;
    let mut shard_paths = Vec::new();
    for (node, shard) in shards.iter().enumerate() {
        if shard.is_empty() {
            return Err(TaskError::EmptyShard {
                split: defaults.split_text.clone(),
                node,
            });
        }
        let path = data.join(format!("shard-{node}.jsonl"));
        write_records(&path, shard)?;
        shard_paths.push(path);
    }
    let union = data.join("union.jsonl");
    write_records(&union, &records)?;
    let eval = data.join("eval-subset.jsonl");
    write_records(
        &eval,
        &eval_records[..defaults.eval_examples.min(eval_records.len())],
    )?;
    Ok(Task {
        shards: shard_paths,
        union,
        eval,
        model_args,
        train,
        model_label,
        data_label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TaskDefaults {
        TaskDefaults {
            nodes: 2,
            split: SplitStrategy::Iid,
            split_text: "iid".into(),
            seed: 3,
            examples_per_node: 10,
            eval_examples: 4,
            batch_size: 8,
            lr: 3e-3,
            preset: "tiny".into(),
        }
    }

    fn with_config(text: &str) -> (tempfile::TempDir, TaskArgs) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("train.toml");
        std::fs::write(&path, text).expect("write");
        let args = TaskArgs {
            train_config: Some(path),
            ..TaskArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn the_train_config_wins_over_the_testnet_flags_in_either_layout() {
        let (_dir, args) = with_config("lr = 0.01\nbatch_size = 2\n");
        let table = train_table(&args, &defaults()).expect("table");
        assert_eq!(table["lr"].as_float(), Some(0.01));
        assert_eq!(table["batch_size"].as_integer(), Some(2));
        // The testnet's own settings fill in the rest.
        assert_eq!(table["seed"].as_integer(), Some(3));
        // A node config's [train] table is read the same way; --prefix wins over both.
        let (_dir, mut args) = with_config("[node]\nmesh = \"x\"\n[train]\nlr = 0.02\n");
        args.prefix = Some("summarise: ".into());
        let table = train_table(&args, &defaults()).expect("table");
        assert_eq!(table["lr"].as_float(), Some(0.02));
        assert_eq!(table["prefix"].as_str(), Some("summarise: "));
        assert!(!table.contains_key("node"));
    }

    #[test]
    fn a_train_config_with_an_unknown_or_bad_setting_is_refused_by_name() {
        for (text, needle) in [
            ("colour = 1\n", "colour"),
            ("lr = \"fast\"\n", "lr"),
            ("lr = [\n", "--train-config"),
        ] {
            let (_dir, args) = with_config(text);
            let err = train_table(&args, &defaults()).expect_err(text).to_string();
            assert!(
                err.contains("--train-config") && err.contains(needle),
                "{text}: {err}"
            );
        }
    }
}
