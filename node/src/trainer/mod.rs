//! Local training on a dedicated blocking thread. The node's async tasks talk to it through
//! a [`TrainerHandle`] (bounded command channel, oneshot replies), so the network keeps
//! answering while a round trains.
//!
//! Owns: the model, its optimizer and the local data ([`T5Trainer`]). Must not touch: the
//! network, rounds or aggregation; it only trains, evaluates, swaps weights and saves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use meshtune_model::checkpoint::{
    HostParam, latest_checkpoint, load_checkpoint, load_extras, save_checkpoint_with_extras,
};
use meshtune_model::config::T5Config;
use meshtune_model::data::SamsumRecord;
use meshtune_model::exchange::{ExchangeScope, assign_tensors, module_tensors};
use meshtune_model::lora::{PeftInit, attach_lora};
use meshtune_model::t5::T5;
use meshtune_model::tokenizer::T5Tokenizer;
use meshtune_model::train::TrainState;
use meshtune_protocol::TensorSet;
use tokio::sync::{mpsc, oneshot};

pub mod config;
pub mod data;
pub mod eval;
pub mod model;

pub use self::config::{OptimizerName, TrainConfig, TrainConfigError};
use self::data::{TokenizedExample, epoch_batches, to_batch, tokenize};
use self::eval::evaluate;

/// What a training call did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    /// Examples seen.
    pub samples: u64,
    /// Mean loss over the steps.
    pub loss: f64,
    pub seconds: f64,
    /// Source + target tokens trained on (no padding).
    #[serde(default)]
    pub tokens: u64,
    /// Joules the power reader measured while training (`None`: no reader).
    #[serde(default)]
    pub energy_j: Option<f64>,
}

/// Held-out quality.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub loss: f64,
    pub rouge_l: f64,
    /// Wall time of the evaluation.
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub energy_j: Option<f64>,
}

/// A node-level checkpoint as the trainer restores it.
#[derive(Debug, Clone)]
pub struct Restored {
    pub state: serde_json::Value,
    pub extras: Vec<HostParam>,
}

/// What the node needs from a local trainer.
pub trait LocalTrainer: Send + 'static {
    /// The exchanged parameters now.
    fn weights(&mut self) -> anyhow::Result<TensorSet>;
    /// Replaces the exchanged parameters (optimizer moments stay).
    fn set_weights(&mut self, weights: &TensorSet) -> anyhow::Result<()>;
    /// `steps` optimizer steps on the local data.
    fn train(&mut self, steps: usize) -> anyhow::Result<TrainReport>;
    fn evaluate(&mut self) -> anyhow::Result<EvalReport>;
    /// Atomic checkpoint of model, optimizer, data position, `state` and `extras` under `root`.
    fn save(
        &mut self,
        root: &Path,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<PathBuf>;
    /// Restores the newest checkpoint under `root`, if any.
    fn restore(&mut self, root: &Path) -> anyhow::Result<Option<Restored>>;
}

/// A node's own examples: what it trains on, and what it evaluates on.
#[derive(Debug)]
pub struct LocalData<'a> {
    pub train: &'a [SamsumRecord],
    pub eval: Vec<SamsumRecord>,
}

/// FLAN-T5 (full or LoRA) on local Samsum-format data.
pub struct T5Trainer<B: AutodiffBackend> {
    state: TrainState<B>,
    device: B::Device,
    model_config: T5Config,
    tokenizer: T5Tokenizer,
    config: TrainConfig,
    scope: ExchangeScope,
    train: Vec<TokenizedExample>,
    eval: Vec<TokenizedExample>,
    eval_records: Vec<SamsumRecord>,
    epoch: u64,
    position: usize,
    batches: Vec<Vec<usize>>,
}

impl<B: AutodiffBackend> T5Trainer<B> {
    /// `model` is the starting point (all nodes of a mesh must start from the same one);
    /// with `lora`, adapters are attached and only they are exchanged.
    pub fn new(
        model: T5<B>,
        model_config: T5Config,
        tokenizer: T5Tokenizer,
        config: TrainConfig,
        lora: bool,
        data: LocalData<'_>,
        device: B::Device,
    ) -> anyhow::Result<Self> {
        let (train_records, eval_records) = (data.train, data.eval);
        config.validate()?;
        anyhow::ensure!(!train_records.is_empty(), "no training examples");
        let model = if lora {
            attach_lora(
                model,
                &config.lora,
                &mut PeftInit::<B> {
                    device: device.clone(),
                },
            )?
        } else {
            model
        };
        let train = tokenize(train_records, &tokenizer, &config)?;
        let eval = tokenize(&eval_records, &tokenizer, &config)?;
        let batches = epoch_batches(&train, config.batch_size, config.seed, 0);
        Ok(Self {
            state: TrainState::new(model, config.step_config()),
            device,
            model_config,
            tokenizer,
            scope: if lora {
                ExchangeScope::LoraAdapters
            } else {
                ExchangeScope::All
            },
            config,
            train,
            eval,
            eval_records,
            epoch: 0,
            position: 0,
            batches,
        })
    }
}

/// Held from seeding the backend's random generator to the end of the step that draws from it.
static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl<B: AutodiffBackend> LocalTrainer for T5Trainer<B> {
    fn weights(&mut self) -> anyhow::Result<TensorSet> {
        Ok(module_tensors(&self.state.model, self.scope)?)
    }

    fn set_weights(&mut self, weights: &TensorSet) -> anyhow::Result<()> {
        self.state.model = assign_tensors(self.state.model.clone(), weights)?;
        Ok(())
    }

    fn train(&mut self, steps: usize) -> anyhow::Result<TrainReport> {
        let started = Instant::now();
        let mut loss = 0.0;
        let mut samples = 0u64;
        let mut tokens = 0u64;
        for _ in 0..steps {
            let mut micro = Vec::with_capacity(self.config.grad_accum);
            for _ in 0..self.config.grad_accum {
                if self.position >= self.batches.len() {
                    self.epoch += 1;
                    self.position = 0;
                    self.batches = epoch_batches(
                        &self.train,
                        self.config.batch_size,
                        self.config.seed,
                        self.epoch,
                    );
                }
                let rows = &self.batches[self.position];
                samples += rows.len() as u64;
                tokens += rows
                    .iter()
                    .map(|&i| (self.train[i].source.len() + self.train[i].target.len()) as u64)
                    .sum::<u64>();
                micro.push(to_batch(&self.train, rows, &self.model_config)?);
                self.position += 1;
            }
            // burn's CPU random generator is global to the process: seeding and stepping
            // under one lock keeps several trainers in one process (the in-process
            // simulation) from drawing each other's dropout masks, so a run repeats exactly.
            let _rng = RNG_LOCK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            B::seed(
                &self.device,
                self.config.seed.wrapping_add(self.state.step as u64),
            );
            let stats = self.state.step(&micro)?;
            if stats.skipped {
                tracing::warn!(
                    step = stats.step + 1,
                    loss_scale = stats.loss_scale,
                    "fp16 gradients overflowed: step skipped, loss scale halved"
                );
            }
            loss += stats.loss;
        }
        Ok(TrainReport {
            steps,
            samples,
            loss: if steps == 0 {
                f64::NAN
            } else {
                loss / steps as f64
            },
            seconds: started.elapsed().as_secs_f64(),
            tokens,
            energy_j: None,
        })
    }

    fn evaluate(&mut self) -> anyhow::Result<EvalReport> {
        let started = Instant::now();
        let (loss, rouge) = evaluate(
            &self.state.model.valid(),
            &self.model_config,
            &self.tokenizer,
            &self.eval,
            &self.eval_records,
            &self.config,
        )?;
        Ok(EvalReport {
            loss,
            rouge_l: rouge.2,
            seconds: started.elapsed().as_secs_f64(),
            energy_j: None,
        })
    }

    fn save(
        &mut self,
        root: &Path,
        index: usize,
        mut state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<PathBuf> {
        state["epoch"] = self.epoch.into();
        state["position"] = self.position.into();
        state["train_step"] = self.state.step.into();
        Ok(save_checkpoint_with_extras(
            root,
            index,
            &self.state.model,
            &self.state.optimizer,
            &state,
            2,
            &extras,
        )?)
    }

    fn restore(&mut self, root: &Path) -> anyhow::Result<Option<Restored>> {
        let Some(dir) = latest_checkpoint(root)? else {
            return Ok(None);
        };
        let (model, state) = load_checkpoint(
            &dir,
            self.state.model.clone(),
            &mut self.state.optimizer,
            &self.device,
        )
        .with_context(|| format!("restoring {}", dir.display()))?;
        self.state.model = model;
        self.epoch = state["epoch"].as_u64().unwrap_or(0);
        self.position = state["position"].as_u64().unwrap_or(0) as usize;
        self.state.step = state["train_step"].as_u64().unwrap_or(0) as usize;
        self.batches = epoch_batches(
            &self.train,
            self.config.batch_size,
            self.config.seed,
            self.epoch,
        );
        let extras = load_extras(&dir)?;
        Ok(Some(Restored { state, extras }))
    }
}

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

enum TrainerCommand {
    Weights(Reply<TensorSet>),
    SetWeights(TensorSet, Reply<()>),
    Train(usize, Reply<TrainReport>),
    Evaluate(Reply<EvalReport>),
    Save {
        root: PathBuf,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
        reply: Reply<PathBuf>,
    },
    Restore(PathBuf, Reply<Option<Restored>>),
}

/// The async side of the trainer thread. Dropping every handle stops the thread after its
/// current command.
#[derive(Clone)]
pub struct TrainerHandle {
    commands: mpsc::Sender<TrainerCommand>,
}

impl std::fmt::Debug for TrainerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrainerHandle")
    }
}

impl TrainerHandle {
    /// Moves `trainer` onto its own thread.
    pub fn spawn(name: &str, mut trainer: impl LocalTrainer) -> anyhow::Result<Self> {
        let (commands, mut receiver) = mpsc::channel::<TrainerCommand>(4);
        std::thread::Builder::new()
            .name(format!("trainer-{name}"))
            .spawn(move || {
                while let Some(command) = receiver.blocking_recv() {
                    match command {
                        TrainerCommand::Weights(reply) => {
                            let _ = reply.send(trainer.weights());
                        }
                        TrainerCommand::SetWeights(weights, reply) => {
                            let _ = reply.send(trainer.set_weights(&weights));
                        }
                        TrainerCommand::Train(steps, reply) => {
                            let _ = reply.send(trainer.train(steps));
                        }
                        TrainerCommand::Evaluate(reply) => {
                            let _ = reply.send(trainer.evaluate());
                        }
                        TrainerCommand::Save {
                            root,
                            index,
                            state,
                            extras,
                            reply,
                        } => {
                            let _ = reply.send(trainer.save(&root, index, state, extras));
                        }
                        TrainerCommand::Restore(root, reply) => {
                            let _ = reply.send(trainer.restore(&root));
                        }
                    }
                }
            })
            .context("spawning the trainer thread")?;
        Ok(Self { commands })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> TrainerCommand) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the trainer thread has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the trainer thread stopped (panicked?) mid-command"))?
    }

    pub async fn weights(&self) -> anyhow::Result<TensorSet> {
        self.call(TrainerCommand::Weights).await
    }

    pub async fn set_weights(&self, weights: TensorSet) -> anyhow::Result<()> {
        self.call(|r| TrainerCommand::SetWeights(weights, r)).await
    }

    pub async fn train(&self, steps: usize) -> anyhow::Result<TrainReport> {
        self.call(|r| TrainerCommand::Train(steps, r)).await
    }

    pub async fn evaluate(&self) -> anyhow::Result<EvalReport> {
        self.call(TrainerCommand::Evaluate).await
    }

    pub async fn save(
        &self,
        root: PathBuf,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<PathBuf> {
        self.call(|reply| TrainerCommand::Save {
            root,
            index,
            state,
            extras,
            reply,
        })
        .await
    }

    pub async fn restore(&self, root: PathBuf) -> anyhow::Result<Option<Restored>> {
        self.call(|r| TrainerCommand::Restore(root, r)).await
    }
}
