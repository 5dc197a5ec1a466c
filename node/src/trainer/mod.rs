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
    HostParam, latest_checkpoint, load_checkpoint, load_extras, snapshot_checkpoint,
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
    /// A checkpoint of model, optimizer, data position, `state` and `extras`, taken now; the
    /// returned write puts it under `root` atomically. The trainer thread hands the write to
    /// its writer thread, so training does not wait for the disk.
    fn save(
        &mut self,
        root: &Path,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<CheckpointWrite>;
    /// Restores the newest checkpoint under `root`, if any.
    fn restore(&mut self, root: &Path) -> anyhow::Result<Option<Restored>>;
}

/// The disk half of a checkpoint (see [`LocalTrainer::save`]).
pub type CheckpointWrite = Box<dyn FnOnce() -> anyhow::Result<PathBuf> + Send>;

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
    ) -> anyhow::Result<CheckpointWrite> {
        state["epoch"] = self.epoch.into();
        state["position"] = self.position.into();
        state["train_step"] = self.state.step.into();
        let snapshot = snapshot_checkpoint(
            index,
            &self.state.model,
            &self.state.optimizer,
            &state,
            2,
            &extras,
        )?;
        let root = root.to_path_buf();
        Ok(Box::new(move || Ok(snapshot.write(&root)?)))
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
    /// Train on from the current model (moved to `base + share x (current - base)` when a
    /// base and share are given), remembering the start as the anchor of a later `Rebase`.
    TrainAhead(usize, Option<(TensorSet, f32)>, Reply<TrainReport>),
    /// Move what was learnt since the anchor onto this base; answers the new weights, or
    /// `None` when the model was replaced since the anchor (a sync adopted another state).
    Rebase(TensorSet, Reply<Option<TensorSet>>),
    /// Evaluate these weights (the current model, if none), keeping the current model.
    Evaluate(Option<TensorSet>, Reply<EvalReport>),
    Save {
        /// The weights to save (the current model, if none), keeping the current model.
        weights: Option<TensorSet>,
        root: PathBuf,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
        reply: Reply<PathBuf>,
    },
    Restore(PathBuf, Reply<Option<Restored>>),
}

/// The trainer thread's state besides the trainer: the anchor of an ahead phase (the model it
/// started from, see `averaging::overlap`).
struct TrainerThread<T> {
    trainer: T,
    anchor: Option<TensorSet>,
    /// Writes checkpoints in the order they were taken, off the training thread. One write may
    /// wait while another runs (each holds a host copy of the model and its moments); a third
    /// checkpoint blocks the trainer until the disk catches up.
    writer: std::sync::mpsc::SyncSender<(CheckpointWrite, Reply<PathBuf>)>,
}

impl<T: LocalTrainer> TrainerThread<T> {
    fn serve(&mut self, command: TrainerCommand) {
        let trainer = &mut self.trainer;
        match command {
            TrainerCommand::Weights(reply) => {
                let _ = reply.send(trainer.weights());
            }
            TrainerCommand::SetWeights(weights, reply) => {
                // A replaced model has nothing to rebase.
                self.anchor = None;
                let _ = reply.send(self.trainer.set_weights(&weights));
            }
            TrainerCommand::Train(steps, reply) => {
                let _ = reply.send(trainer.train(steps));
            }
            TrainerCommand::TrainAhead(steps, start, reply) => {
                let _ = reply.send(self.train_ahead(steps, start));
            }
            TrainerCommand::Rebase(base, reply) => {
                let _ = reply.send(self.rebase(base));
            }
            TrainerCommand::Evaluate(weights, reply) => {
                let _ = reply.send(self.at(weights, |t| t.evaluate()));
            }
            TrainerCommand::Save {
                weights,
                root,
                index,
                state,
                extras,
                reply,
            } => match self.at(weights, |t| t.save(&root, index, state, extras)) {
                Ok(write) => {
                    if let Err(std::sync::mpsc::SendError((_, reply))) =
                        self.writer.send((write, reply))
                    {
                        let stopped = anyhow::anyhow!("the checkpoint writer thread stopped");
                        let _ = reply.send(Err(stopped));
                    }
                }
                Err(err) => {
                    let _ = reply.send(Err(err));
                }
            },
            TrainerCommand::Restore(root, reply) => {
                let _ = reply.send(trainer.restore(&root));
            }
        }
    }

    /// Sets the ahead phase's start (see [`TrainerHandle::train_ahead`]) as the anchor and
    /// trains from it.
    fn train_ahead(
        &mut self,
        steps: usize,
        start: Option<(TensorSet, f32)>,
    ) -> anyhow::Result<TrainReport> {
        let mut anchor = self.trainer.weights()?;
        if let Some((base, share)) = start {
            anyhow::ensure!(
                base.layout() == anchor.layout(),
                "train ahead: the base's layout differs from the model's"
            );
            for ((_, values), from) in anchor.values_mut().zip(base.tensors()) {
                for (value, from) in values.iter_mut().zip(&from.values) {
                    *value = from + share * (*value - from);
                }
            }
            self.trainer.set_weights(&anchor)?;
        }
        self.anchor = Some(anchor);
        self.trainer.train(steps)
    }

    /// `base + (current - anchor)`, made the current model (`None` without an anchor).
    fn rebase(&mut self, mut base: TensorSet) -> anyhow::Result<Option<TensorSet>> {
        let Some(anchor) = self.anchor.take() else {
            return Ok(None);
        };
        let current = self.trainer.weights()?;
        anyhow::ensure!(
            base.layout() == current.layout() && anchor.layout() == current.layout(),
            "rebase: the base's layout differs from the model's"
        );
        let learnt = current.tensors().iter().zip(anchor.tensors());
        for ((_, values), (now, then)) in base.values_mut().zip(learnt) {
            for ((value, now), then) in values.iter_mut().zip(&now.values).zip(&then.values) {
                *value += now - then;
            }
        }
        self.trainer.set_weights(&base)?;
        Ok(Some(base))
    }

    /// Runs `work` on `weights` (when given) and puts the current model back afterwards.
    fn at<R>(
        &mut self,
        weights: Option<TensorSet>,
        work: impl FnOnce(&mut T) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let Some(weights) = weights else {
            return work(&mut self.trainer);
        };
        let current = self.trainer.weights()?;
        self.trainer.set_weights(&weights)?;
        let result = work(&mut self.trainer);
        self.trainer.set_weights(&current)?;
        result
    }
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
    pub fn spawn(name: &str, trainer: impl LocalTrainer) -> anyhow::Result<Self> {
        let (commands, mut receiver) = mpsc::channel::<TrainerCommand>(4);
        let (writer, writes) =
            std::sync::mpsc::sync_channel::<(CheckpointWrite, Reply<PathBuf>)>(1);
        std::thread::Builder::new()
            .name(format!("checkpoints-{name}"))
            .spawn(move || {
                for (write, reply) in writes {
                    let _ = reply.send(write());
                }
            })
            .context("spawning the checkpoint writer thread")?;
        let mut thread = TrainerThread {
            trainer,
            anchor: None,
            writer,
        };
        std::thread::Builder::new()
            .name(format!("trainer-{name}"))
            .spawn(move || {
                while let Some(command) = receiver.blocking_recv() {
                    thread.serve(command);
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
        self.call(|r| TrainerCommand::Evaluate(None, r)).await
    }

    /// Trains `steps` ahead from the current model θ', or, given `(base, share)`, from
    /// `base + share x (θ' - base)`; the start becomes the anchor of [`Self::rebase`].
    pub async fn train_ahead(
        &self,
        steps: usize,
        start: Option<(TensorSet, f32)>,
    ) -> anyhow::Result<TrainReport> {
        self.call(|r| TrainerCommand::TrainAhead(steps, start, r))
            .await
    }

    /// Moves what the last ahead phase learnt onto `base`: the model becomes
    /// `base + (current - anchor)`, returned; `None` when the model was replaced
    /// ([`Self::set_weights`]) since the ahead phase started.
    pub async fn rebase(&self, base: TensorSet) -> anyhow::Result<Option<TensorSet>> {
        self.call(|r| TrainerCommand::Rebase(base, r)).await
    }

    /// Evaluates `weights` and keeps the current model.
    pub async fn evaluate_at(&self, weights: TensorSet) -> anyhow::Result<EvalReport> {
        self.call(|r| TrainerCommand::Evaluate(Some(weights), r))
            .await
    }

    /// Saves a checkpoint (`weights` instead of the current model, when given; the current
    /// model stays) and returns once it is on disk.
    pub async fn save(
        &self,
        weights: Option<TensorSet>,
        root: PathBuf,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<PathBuf> {
        let written = self
            .save_queued(weights, root, index, state, extras)
            .await?;
        written.await
    }

    /// [`Self::save`] that returns once the checkpoint is taken (in the trainer's queue, ahead
    /// of any later command); the returned future ends when it is on disk.
    pub async fn save_queued(
        &self,
        weights: Option<TensorSet>,
        root: PathBuf,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<PathBuf>> + use<>> {
        let (reply, answer) = oneshot::channel();
        let command = TrainerCommand::Save {
            weights,
            root,
            index,
            state,
            extras,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| anyhow::anyhow!("the trainer thread has stopped"))?;
        Ok(async move {
            answer
                .await
                .map_err(|_| anyhow::anyhow!("the trainer thread stopped mid-checkpoint"))?
        })
    }

    pub async fn restore(&self, root: PathBuf) -> anyhow::Result<Option<Restored>> {
        self.call(|r| TrainerCommand::Restore(root, r)).await
    }
}
