//! Local training on a dedicated blocking thread. The node's async tasks talk to it through
//! a [`TrainerHandle`] (bounded command channel, oneshot replies), so the network keeps
//! answering while a round trains.
//!
//! Owns: the model, its optimizer and the local data ([`T5Trainer`]). Must not touch: the
//! network, rounds or aggregation; it only trains, evaluates, swaps weights and saves.

use std::path::{Path, PathBuf};
use std::time::Instant;

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
pub mod error;
pub mod eval;
pub mod model;

pub use self::config::{OptimizerName, TrainConfig, TrainConfigError};
use self::data::{TokenizedExample, epoch_batches, to_batch, tokenize};
pub use self::error::{ModelSourceError, TrainerError};
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
    fn weights(&mut self) -> Result<TensorSet, TrainerError>;
    /// Replaces the exchanged parameters (optimizer moments stay).
    fn set_weights(&mut self, weights: &TensorSet) -> Result<(), TrainerError>;
    /// `steps` optimizer steps on the local data.
    fn train(&mut self, steps: usize) -> Result<TrainReport, TrainerError>;
    fn evaluate(&mut self) -> Result<EvalReport, TrainerError>;
    /// A checkpoint of model, optimizer, data position, `state` and `extras`, taken now; the
    /// returned write puts it under `root` atomically. The trainer thread hands the write to
    /// its writer thread, so training does not wait for the disk.
    fn save(
        &mut self,
        root: &Path,
        index: usize,
        state: serde_json::Value,
        extras: Vec<HostParam>,
    ) -> Result<CheckpointWrite, TrainerError>;
    /// Restores the newest checkpoint under `root`, if any.
    fn restore(&mut self, root: &Path) -> Result<Option<Restored>, TrainerError>;
}

/// The disk half of a checkpoint (see [`LocalTrainer::save`]).
pub type CheckpointWrite = Box<dyn FnOnce() -> Result<PathBuf, TrainerError> + Send>;

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
    ) -> Result<Self, TrainerError> {
        let (train_records, eval_records) = (data.train, data.eval);
        config.validate()?;
        if train_records.is_empty() {
            return Err(TrainerError::NoExamples);
        }
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
    fn weights(&mut self) -> Result<TensorSet, TrainerError> {
        Ok(module_tensors(&self.state.model, self.scope)?)
    }

    fn set_weights(&mut self, weights: &TensorSet) -> Result<(), TrainerError> {
        self.state.model = assign_tensors(self.state.model.clone(), weights)?;
        Ok(())
    }

    fn train(&mut self, steps: usize) -> Result<TrainReport, TrainerError> {
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

    fn evaluate(&mut self) -> Result<EvalReport, TrainerError> {
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
    ) -> Result<CheckpointWrite, TrainerError> {
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

    fn restore(&mut self, root: &Path) -> Result<Option<Restored>, TrainerError> {
        let Some(dir) = latest_checkpoint(root)? else {
            return Ok(None);
        };
        let (model, state) = load_checkpoint(
            &dir,
            self.state.model.clone(),
            &mut self.state.optimizer,
            &self.device,
        )
        .map_err(|source| TrainerError::Restore {
            dir: dir.clone(),
            source,
        })?;
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

type Reply<T> = oneshot::Sender<Result<T, TrainerError>>;

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
                        let _ = reply.send(Err(TrainerError::WriterStopped));
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
    ) -> Result<TrainReport, TrainerError> {
        let mut anchor = self.trainer.weights()?;
        if let Some((base, share)) = start {
            same_layout("train ahead", &base, &anchor)?;
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
    fn rebase(&mut self, mut base: TensorSet) -> Result<Option<TensorSet>, TrainerError> {
        let Some(anchor) = self.anchor.take() else {
            return Ok(None);
        };
        let current = self.trainer.weights()?;
        same_layout("rebase", &base, &current)?;
        same_layout("rebase (the anchor)", &anchor, &current)?;
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
        work: impl FnOnce(&mut T) -> Result<R, TrainerError>,
    ) -> Result<R, TrainerError> {
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

/// `Err` naming `doing` unless `weights` has the tensors and shapes of `model`.
fn same_layout(
    doing: &'static str,
    weights: &TensorSet,
    model: &TensorSet,
) -> Result<(), TrainerError> {
    let (got, want) = (weights.layout(), model.layout());
    if got == want {
        return Ok(());
    }
    let first = got.specs().iter().zip(want.specs()).find(|(g, w)| g != w);
    let detail = match first {
        Some((g, w)) => format!(
            "`{}` {:?} where the model has `{}` {:?}",
            g.name, g.shape, w.name, w.shape
        ),
        None => format!("{} tensors where the model has {}", got.len(), want.len()),
    };
    Err(TrainerError::Layout { doing, detail })
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
    pub fn spawn(name: &str, trainer: impl LocalTrainer) -> Result<Self, TrainerError> {
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
            .map_err(|source| TrainerError::Spawn {
                thread: "checkpoint writer",
                source,
            })?;
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
            .map_err(|source| TrainerError::Spawn {
                thread: "trainer",
                source,
            })?;
        Ok(Self { commands })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> TrainerCommand,
    ) -> Result<T, TrainerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| TrainerError::Stopped)?;
        answer.await.map_err(|_| TrainerError::StoppedMidCommand)?
    }

    pub async fn weights(&self) -> Result<TensorSet, TrainerError> {
        self.call(TrainerCommand::Weights).await
    }

    pub async fn set_weights(&self, weights: TensorSet) -> Result<(), TrainerError> {
        self.call(|r| TrainerCommand::SetWeights(weights, r)).await
    }

    pub async fn train(&self, steps: usize) -> Result<TrainReport, TrainerError> {
        self.call(|r| TrainerCommand::Train(steps, r)).await
    }

    pub async fn evaluate(&self) -> Result<EvalReport, TrainerError> {
        self.call(|r| TrainerCommand::Evaluate(None, r)).await
    }

    /// Trains `steps` ahead from the current model θ', or, given `(base, share)`, from
    /// `base + share x (θ' - base)`; the start becomes the anchor of [`Self::rebase`].
    pub async fn train_ahead(
        &self,
        steps: usize,
        start: Option<(TensorSet, f32)>,
    ) -> Result<TrainReport, TrainerError> {
        self.call(|r| TrainerCommand::TrainAhead(steps, start, r))
            .await
    }

    /// Moves what the last ahead phase learnt onto `base`: the model becomes
    /// `base + (current - anchor)`, returned; `None` when the model was replaced
    /// ([`Self::set_weights`]) since the ahead phase started.
    pub async fn rebase(&self, base: TensorSet) -> Result<Option<TensorSet>, TrainerError> {
        self.call(|r| TrainerCommand::Rebase(base, r)).await
    }

    /// Evaluates `weights` and keeps the current model.
    pub async fn evaluate_at(&self, weights: TensorSet) -> Result<EvalReport, TrainerError> {
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
    ) -> Result<PathBuf, TrainerError> {
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
    ) -> Result<
        impl std::future::Future<Output = Result<PathBuf, TrainerError>> + use<>,
        TrainerError,
    > {
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
            .map_err(|_| TrainerError::Stopped)?;
        Ok(async move { answer.await.map_err(|_| TrainerError::StoppedMidCommand)? })
    }

    pub async fn restore(&self, root: PathBuf) -> Result<Option<Restored>, TrainerError> {
        self.call(|r| TrainerCommand::Restore(root, r)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtune_model::error::ModelError;
    use meshtune_protocol::Tensor;

    fn set(name: &str, len: usize) -> TensorSet {
        TensorSet::new(vec![
            Tensor::new(name, vec![len], vec![0.5; len]).expect("tensor"),
        ])
        .expect("set")
    }

    /// Holds weights and nothing else; `train(13)` panics, as a trainer with a bug would.
    struct Held(TensorSet);

    impl LocalTrainer for Held {
        fn weights(&mut self) -> Result<TensorSet, TrainerError> {
            Ok(self.0.clone())
        }
        fn set_weights(&mut self, weights: &TensorSet) -> Result<(), TrainerError> {
            same_layout("set weights", weights, &self.0)?;
            self.0 = weights.clone();
            Ok(())
        }
        fn train(&mut self, steps: usize) -> Result<TrainReport, TrainerError> {
            assert_ne!(steps, 13, "a trainer bug");
            Ok(TrainReport {
                steps,
                samples: 0,
                loss: 0.0,
                seconds: 0.0,
                tokens: 0,
                energy_j: None,
            })
        }
        fn evaluate(&mut self) -> Result<EvalReport, TrainerError> {
            Err(TrainerError::NoExamples)
        }
        fn save(
            &mut self,
            _: &Path,
            _: usize,
            _: serde_json::Value,
            _: Vec<HostParam>,
        ) -> Result<CheckpointWrite, TrainerError> {
            Ok(Box::new(|| {
                Err(ModelError::Input("the disk is full".into()).into())
            }))
        }
        fn restore(&mut self, _: &Path) -> Result<Option<Restored>, TrainerError> {
            Ok(None)
        }
    }

    #[test]
    fn a_layout_error_names_the_first_tensor_that_differs() {
        let err = same_layout("rebase", &set("w", 3), &set("w", 4)).expect_err("differs");
        let text = err.to_string();
        assert!(
            text.contains("rebase") && text.contains("`w` [3]") && text.contains("[4]"),
            "{text}"
        );
        assert!(same_layout("rebase", &set("w", 3), &set("w", 3)).is_ok());
    }

    #[tokio::test]
    async fn trainer_errors_reach_the_caller_typed_and_a_dead_thread_is_reported() {
        let handle = TrainerHandle::spawn("test", Held(set("w", 4))).expect("spawn");
        let err = handle.set_weights(set("w", 5)).await.expect_err("layout");
        assert!(matches!(err, TrainerError::Layout { .. }), "{err:?}");
        let err = handle.evaluate().await.expect_err("no examples");
        assert!(matches!(err, TrainerError::NoExamples), "{err:?}");
        // The write runs on the writer thread and its error comes back to the saver.
        let err = handle
            .save(
                None,
                PathBuf::from("unused"),
                0,
                serde_json::json!({}),
                vec![],
            )
            .await
            .expect_err("write");
        assert!(err.to_string().contains("the disk is full"), "{err}");
        // Rebase without an ahead phase has nothing to move; with one, the layout is checked.
        assert!(handle.rebase(set("w", 4)).await.expect("rebase").is_none());
        handle.train_ahead(1, None).await.expect("ahead");
        let err = handle.rebase(set("w", 5)).await.expect_err("layout");
        assert!(err.to_string().contains("rebase"), "{err}");
        // A panic on the trainer thread ends it: this command and every later one say so.
        let err = handle.train(13).await.expect_err("panicked");
        assert!(matches!(err, TrainerError::StoppedMidCommand), "{err:?}");
        let err = handle.weights().await.expect_err("stopped");
        assert!(
            matches!(err, TrainerError::Stopped | TrainerError::StoppedMidCommand),
            "{err:?}"
        );
    }
}
