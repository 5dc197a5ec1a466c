//! A node's history on disk and on offer: the checkpoint after every applied round (model,
//! optimizer moments, data position, error-feedback residuals, outer optimizer state, anchor),
//! `rounds.jsonl`, and the state it serves to late joiners and lagging peers.
//!
//! Owns: `OUT/checkpoints/`, `OUT/rounds.jsonl`, `OUT/state/` and the state entry of the blob
//! store. Must not touch: rounds (the coordinator decides when to write) or the swarm.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use meshtune_model::checkpoint::HostParam;
use meshtune_protocol::{
    BlobDescriptor, EncodedStateIndex, ErrorFeedback, ModelHash, StateCodecParams, StateManifest,
    TensorSet, VerifiedFile, chunk_blob, encode_state, encode_state_to,
};

use super::config::CoordinatorConfig;
use super::error::{RunError, ServeError};
use super::record::{RoundRecord, append_record, read_records, rewrite_records};
use crate::averaging::aggregate::OuterState;
use crate::network::store::{BlobBytes, BlobFile, BlobStore, lock as lock_store};
use crate::trainer::{Restored, TrainerHandle};

/// Where a node's history goes (see the module docs).
pub struct Ledger {
    trainer: TrainerHandle,
    store: Arc<Mutex<BlobStore>>,
    config: CoordinatorConfig,
    me: PeerId,
    checkpoints: PathBuf,
    rounds_path: PathBuf,
    /// Every record of this run (and of the run it resumed), oldest first.
    pub records: Vec<RoundRecord>,
}

impl Ledger {
    /// Creates `OUT/` if needed.
    pub fn open(
        config: &CoordinatorConfig,
        me: PeerId,
        trainer: &TrainerHandle,
        store: &Arc<Mutex<BlobStore>>,
    ) -> Result<Self, RunError> {
        std::fs::create_dir_all(&config.out).map_err(|source| RunError::CreateDir {
            path: config.out.clone(),
            source,
        })?;
        Ok(Self {
            trainer: trainer.clone(),
            store: Arc::clone(store),
            config: config.clone(),
            me,
            checkpoints: config.out.join("checkpoints"),
            rounds_path: config.out.join("rounds.jsonl"),
            records: Vec::new(),
        })
    }

    /// Restores the newest checkpoint into the trainer, and the records of the rounds before
    /// the one it resumes at.
    pub async fn restore(&mut self) -> Result<Option<(u64, Restored)>, RunError> {
        let restored = self.trainer.restore(self.checkpoints.clone()).await?;
        let next_round = restored
            .as_ref()
            .map_or(0, |r| r.state["next_round"].as_u64().unwrap_or(0));
        self.records = read_records(&self.rounds_path, next_round);
        Ok(restored.map(|r| (next_round, r)))
    }

    /// Checkpoints the trainer's model (or `weights`) as the resume point `next_round`, and
    /// returns once it is on disk.
    pub async fn checkpoint(
        &self,
        next_round: u64,
        hash: ModelHash,
        extras: Vec<HostParam>,
        weights: Option<TensorSet>,
    ) -> Result<(), RunError> {
        let written = self
            .checkpoint_queued(next_round, hash, extras, weights)
            .await?;
        written.await.map_err(|source| RunError::Checkpoint {
            round: next_round,
            source: Box::new(source),
        })?;
        Ok(())
    }

    /// [`Self::checkpoint`] that returns once the checkpoint is taken (ahead of any later
    /// trainer command); the returned future ends when it is on disk.
    pub async fn checkpoint_queued(
        &self,
        next_round: u64,
        hash: ModelHash,
        extras: Vec<HostParam>,
        weights: Option<TensorSet>,
    ) -> Result<super::persist::Written, RunError> {
        let written = self
            .trainer
            .save_queued(
                weights,
                self.checkpoints.clone(),
                next_round as usize,
                serde_json::json!({
                    "next_round": next_round,
                    "model_hash": hash.to_string(),
                    "topology": self.config.topology.to_string(),
                }),
                extras,
            )
            .await
            .map_err(|source| RunError::Checkpoint {
                round: next_round,
                source: Box::new(source),
            })?;
        Ok(Box::pin(written))
    }

    /// Appends `record` to `rounds.jsonl` and keeps it.
    pub fn record(&mut self, record: RoundRecord) -> Result<(), RunError> {
        append_record(&self.rounds_path, &record)?;
        self.records.push(record);
        Ok(())
    }

    /// Changes the last record (the final-state adoption) and rewrites the file.
    pub fn amend_last(&mut self, amend: impl FnOnce(&mut RoundRecord)) -> Result<(), RunError> {
        if let Some(last) = self.records.last_mut() {
            amend(last);
        }
        rewrite_records(&self.rounds_path, &self.records)?;
        Ok(())
    }

    /// Serves `base` with the outer optimizer state as this node's latest state for `round`.
    pub fn serve(&self, round: u64, base: &TensorSet, outer: &OuterState) -> Result<(), RunError> {
        Ok(blocking(|| {
            serve_state(&self.store, &self.config, self.me, round, base, outer)
        })?)
    }

    /// Adopts `from`'s state of `round` (the model after round `round - 1`): the trainer takes
    /// the weights, the state is checkpointed as this node's resume point and served, and when
    /// rounds were skipped a catch-up record ends them, so a node restarted after the mesh's
    /// last round still ends on a record of the mesh's model. The mesh's outer optimizer state
    /// comes with its model, so the next outer step here is the one every other node takes.
    pub async fn adopt(
        &mut self,
        from: PeerId,
        round: u64,
        weights: TensorSet,
        outer: &OuterState,
        mesh_peers: usize,
    ) -> Result<(TensorSet, ModelHash), RunError> {
        self.trainer.set_weights(weights.clone()).await?;
        let hash = ModelHash::of_tensors(&weights);
        let extras = checkpoint_extras(None, outer, &self.config, &weights);
        self.checkpoint(round, hash, extras, None).await?;
        if let Some(last) = round.checked_sub(1)
            && self.records.last().is_none_or(|r| r.round < last)
        {
            self.record(RoundRecord::synced(last, self.me, from, hash, mesh_peers))?;
        }
        self.serve(round, &weights, outer)?;
        tracing::info!(peer = %from, round, hash = %hash, "adopted a peer's state");
        Ok((weights, hash))
    }
}

/// What a checkpoint holds besides the weights: the error-feedback residuals (when there are
/// any to keep) and the outer optimizer state, restored on start.
pub fn checkpoint_extras(
    feedback: Option<&ErrorFeedback>,
    outer: &OuterState,
    config: &CoordinatorConfig,
    base: &TensorSet,
) -> Vec<HostParam> {
    let mut extras = Vec::new();
    if let Some(fb) = feedback {
        for (name, values) in fb.residuals() {
            extras.push((
                format!("feedback/{name}"),
                vec![values.len()],
                values.to_vec(),
            ));
        }
    }
    for t in outer.to_tensors(config.outer, base).into_tensors() {
        extras.push((format!("outer/{}", t.name), t.shape, t.values));
    }
    extras
}

/// Serves `base` (with the outer optimizer state) as this node's latest state for `round`,
/// encoded losslessly for late joiners and nodes that resynchronise.
pub fn serve_state(
    store: &Arc<Mutex<BlobStore>>,
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    base: &TensorSet,
    outer: &OuterState,
) -> Result<(), ServeError> {
    let outer = outer.to_tensors(config.outer, base);
    let raw = (base.total_elements() + outer.total_elements()) * 4;
    if raw >= config.stream_state_bytes {
        return serve_state_file(store, config, me, round, base, &outer);
    }
    let encoded = encode_state(base, &outer, &StateCodecParams::default())?;
    let chunks = chunk_blob(&encoded.blob, config.chunk_size)?;
    let index = EncodedStateIndex {
        model_hash: encoded.model_hash,
        model: encoded.model,
        optimizer: encoded.optimizer,
    };
    let manifest = state_manifest(config, me, round, chunks.descriptor(), index);
    lock_store(store)?.set_state(manifest, Arc::new(encoded.blob), chunks);
    Ok(())
}

/// A new (or emptied) file for a state blob, open for writing and reading back.
pub fn create_scratch_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// The manifest of this node's state of `round`.
fn state_manifest(
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    blob: BlobDescriptor,
    index: EncodedStateIndex,
) -> StateManifest {
    StateManifest {
        mesh_id: config.mesh_id.clone(),
        round,
        model_hash: index.model_hash,
        sender: me.to_bytes(),
        // Local optimizer steps each node took to reach this model.
        training_steps: round * config.local_steps as u64,
        blob,
        model: index.model,
        optimizer: index.optimizer,
    }
}

/// Runs `work` (encoding a state: seconds to minutes for a large model) without stalling the
/// runtime's other tasks (the network, fetches) on a multi-threaded runtime.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// [`serve_state`] for a large state: encoded straight to `OUT/state/` tensor by tensor and
/// served from there, so the blob never sits in memory next to the model. The store deletes
/// the file once a newer state (and the one before it) replaced it.
fn serve_state_file(
    store: &Arc<Mutex<BlobStore>>,
    config: &CoordinatorConfig,
    me: PeerId,
    round: u64,
    base: &TensorSet,
    outer: &TensorSet,
) -> Result<(), ServeError> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = config.out.join("state");
    let io = |doing: &'static str, path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ServeError::Io {
            doing,
            path,
            source,
        }
    };
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    // A unique name: a state re-served for the same round must not reuse a file the store
    // may still serve (and delete) under the old entry.
    let path = dir.join(format!(
        "state-{round}-{}-{}.blob",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let file = create_scratch_file(&path).map_err(io("creating", &path))?;
    let mut writer = std::io::BufWriter::with_capacity(4 << 20, file);
    let (index, chunks) = encode_state_to(
        base,
        outer,
        &StateCodecParams::default(),
        &mut writer,
        config.chunk_size,
    )
    .map_err(|source| ServeError::EncodeFile {
        path: path.clone(),
        source,
    })?;
    let file = writer
        .into_inner()
        .map_err(|err| io("writing", &path)(err.into_error()))?;
    let verified = VerifiedFile::written(file, &chunks).map_err(|source| ServeError::ReadBack {
        path: path.clone(),
        source,
    })?;
    let manifest = state_manifest(config, me, round, chunks.descriptor(), index);
    let bytes = BlobBytes::File(Arc::new(BlobFile {
        file: verified,
        path,
    }));
    lock_store(store)?.set_state_bytes(manifest, bytes, chunks);
    Ok(())
}
