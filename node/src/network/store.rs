//! The blobs this node can serve: its own deltas, every delta it fetched and verified (so
//! peers can pull from any node that has one, not only the announcer), and its latest state
//! for late joiners.
//!
//! Owns: the in-memory blob table and the answers to [`ChunkRequest`]s. Must not touch:
//! the network (the event loop calls [`BlobStore::serve`] and reads file chunks off its own
//! task) or validation of what goes in (callers insert only verified blobs).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;

use meshtune_protocol::{
    BlobHash, ChunkHash, ChunkList, ChunkListHash, ChunkRequest, ChunkResponse, DeltaManifest,
    ModelHash, StateManifest,
};

#[derive(Debug)]
struct StoredBlob {
    round: u64,
    bytes: BlobBytes,
    chunks: ChunkList,
}

/// A blob's bytes: in memory (deltas, small states) or in a file (large states, so a
/// 12 GB state is never held in RAM next to the model).
#[derive(Debug, Clone)]
pub enum BlobBytes {
    Memory(Arc<Vec<u8>>),
    File(Arc<BlobFile>),
}

impl BlobBytes {
    fn len(&self) -> u64 {
        match self {
            BlobBytes::Memory(bytes) => bytes.len() as u64,
            BlobBytes::File(file) => file.file.size(),
        }
    }
}

/// A verified blob on disk, deleted when the last holder lets go of it.
#[derive(Debug)]
pub struct BlobFile {
    pub file: meshtune_protocol::VerifiedFile,
    pub path: std::path::PathBuf,
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.path) {
            tracing::debug!(file = %self.path.display(), error = %err, "could not remove a blob file");
        }
    }
}

/// A panic while the store was locked left it poisoned: its tables may be half updated, so
/// nothing is served from it any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the blob store's lock is poisoned (a thread panicked while holding it)")]
pub struct StorePoisoned;

/// Locks the store; a poisoned lock is logged at error level and returned as [`StorePoisoned`].
pub fn lock(store: &Mutex<BlobStore>) -> Result<MutexGuard<'_, BlobStore>, StorePoisoned> {
    store.lock().map_err(|_| {
        tracing::error!("the blob store's lock is poisoned: nothing more is served from it");
        StorePoisoned
    })
}

/// What answering a request takes: an answer at hand, a chunk sliced from a blob in memory
/// (no copy), or a chunk still to be read from a file (a blocking read the event loop runs
/// off the swarm task).
#[derive(Debug, Clone)]
pub enum Served {
    Response(ChunkResponse),
    Chunk(Bytes),
    FileChunk(FileChunk),
}

impl Served {
    /// The answer as a [`ChunkResponse`], reading a file chunk here (blocking).
    pub fn into_response_blocking(self) -> ChunkResponse {
        match self {
            Served::Response(response) => response,
            Served::Chunk(bytes) => ChunkResponse::Chunk(bytes.to_vec()),
            Served::FileChunk(chunk) => chunk.read().map_or(ChunkResponse::NotFound, |bytes| {
                ChunkResponse::Chunk(bytes.to_vec())
            }),
        }
    }
}

/// A chunk of a blob kept in a file, not read yet.
#[derive(Debug, Clone)]
pub struct FileChunk {
    file: Arc<BlobFile>,
    range: Range<u64>,
}

impl FileChunk {
    /// Reads the chunk (blocking); a failed read is logged and returned.
    pub fn read(&self) -> std::io::Result<Bytes> {
        let len =
            usize::try_from(self.range.end - self.range.start).map_err(std::io::Error::other)?;
        let mut chunk = vec![0u8; len];
        self.file
            .file
            .read_at(&mut chunk, self.range.start)
            .inspect_err(|err| {
                tracing::warn!(file = %self.file.path.display(), error = %err, "cannot read a state chunk");
            })?;
        Ok(Bytes::from(chunk))
    }
}

/// Lets a [`Bytes`] share a blob held in an `Arc<Vec<u8>>` (slices of it are then views,
/// not copies).
struct SharedBlob(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBlob {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Own delta manifests kept for [`ChunkRequest::CurrentManifest`].
const KEPT_MANIFESTS: usize = 4;

/// A state downloader that asked for nothing for this long frees its upload slot.
const UPLOAD_IDLE: Duration = Duration::from_secs(5);

/// Peers whose copy of this node's model is tracked for gossip links, at most: beyond it a
/// peer gets the q from the anchor every round (correct, only less precise), so a crowd of
/// identities cannot make a node keep a model per identity.
pub const MAX_LINK_HOLDERS: usize = 64;

/// This node's q's of one gossip round ([`ChunkRequest::LinkDelta`]): for each copy of this
/// node's model that a puller may hold (by its hash), the manifest of the q that applies to
/// it and the hash of the copy it leaves. The anchor's entry serves every other copy.
#[derive(Debug, Clone)]
pub struct LinkOffers {
    pub round: u64,
    pub anchor: ModelHash,
    pub by_copy: HashMap<ModelHash, (DeltaManifest, ModelHash)>,
}

/// Verified blobs by hash, forgotten round by round.
#[derive(Debug, Default)]
pub struct BlobStore {
    blobs: HashMap<BlobHash, StoredBlob>,
    lists: HashMap<ChunkListHash, BlobHash>,
    state: Option<(StateManifest, BlobHash)>,
    /// The state served before the current one: a peer that asked for it just before this
    /// node moved on can still finish fetching it.
    previous_state: Option<BlobHash>,
    last_served: Option<Instant>,
    /// Peers pulling chunks of a served state, with when each last asked.
    state_uploads: HashMap<PeerId, Instant>,
    /// At most this many peers pull state chunks at once (0: no cap); more get
    /// [`ChunkResponse::Busy`] and fetch from another donor.
    max_state_uploads: usize,
    /// Chunks served, and `Busy` answers given, since start.
    served_chunks: u64,
    busy_answers: u64,
    /// This node's last announced delta manifests, by round.
    manifests: BTreeMap<u64, DeltaManifest>,
    /// Gossip links: this round's q's, and the copy of this node each puller was last
    /// served (the hash of the copy its q left).
    links: Option<LinkOffers>,
    link_holders: HashMap<PeerId, ModelHash>,
}

impl BlobStore {
    /// A store that serves state chunks to at most `max_state_uploads` peers at once (0: no
    /// cap), so a crowd of late joiners spreads over the donors instead of saturating one.
    #[must_use]
    pub fn with_max_state_uploads(max_state_uploads: usize) -> Self {
        Self {
            max_state_uploads,
            ..Self::default()
        }
    }

    /// Adds a verified blob of `round` with its chunk list.
    pub fn insert(&mut self, round: u64, bytes: Arc<Vec<u8>>, chunks: ChunkList) {
        self.insert_bytes(round, BlobBytes::Memory(bytes), chunks);
    }

    fn insert_bytes(&mut self, round: u64, bytes: BlobBytes, chunks: ChunkList) {
        let hash = chunks.blob_hash();
        self.lists.insert(chunks.hash(), hash);
        self.blobs.insert(
            hash,
            StoredBlob {
                round,
                bytes,
                chunks,
            },
        );
    }

    /// Whether the blob is held.
    /// The delta manifest this node announced last (answers [`ChunkRequest::CurrentManifest`];
    /// the last few rounds' are kept for peers that ask for one of them).
    pub fn set_current_manifest(&mut self, manifest: DeltaManifest) {
        self.manifests.insert(manifest.round, manifest);
        while self.manifests.len() > KEPT_MANIFESTS {
            self.manifests.pop_first();
        }
    }

    /// Serves `offers` to pullers from now on (their blobs must be inserted).
    pub fn set_link_offers(&mut self, offers: LinkOffers) {
        self.links = Some(offers);
    }

    /// The copy of this node's model each tracked puller holds, as far as this node knows
    /// (the result of the q it was served last).
    pub fn link_holders(&self) -> HashMap<PeerId, ModelHash> {
        self.link_holders.clone()
    }

    /// Stops tracking the pullers `keep` refuses (gone peers).
    pub fn retain_link_holders(&mut self, keep: impl Fn(&PeerId) -> bool) {
        self.link_holders.retain(|p, _| keep(p));
    }

    /// The answer to a [`ChunkRequest::LinkDelta`]: the q for the requester's copy when
    /// this round has one, else the q from the anchor; the requester is then taken to hold
    /// the copy that q leaves.
    fn link_answer(
        &mut self,
        peer: PeerId,
        mesh_id: &str,
        round: u64,
        copy: Option<ModelHash>,
        mesh: &str,
    ) -> ChunkResponse {
        let Some(offers) = &self.links else {
            return ChunkResponse::NotFound;
        };
        if mesh_id != mesh || offers.round < round {
            return ChunkResponse::NotFound;
        }
        let entry = copy
            .and_then(|h| offers.by_copy.get(&h))
            .or_else(|| offers.by_copy.get(&offers.anchor));
        let Some((manifest, result)) = entry else {
            return ChunkResponse::NotFound;
        };
        if self.link_holders.len() < MAX_LINK_HOLDERS || self.link_holders.contains_key(&peer) {
            self.link_holders.insert(peer, *result);
        }
        ChunkResponse::Manifest(manifest.clone())
    }

    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.blobs.contains_key(hash)
    }

    /// The blob's bytes, if held.
    pub fn get(&self, hash: &BlobHash) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(hash).and_then(|b| match &b.bytes {
            BlobBytes::Memory(bytes) => Some(Arc::clone(bytes)),
            BlobBytes::File(_) => None,
        })
    }

    /// Serves `manifest` (and its blob, inserted under its round) to late joiners.
    pub fn set_state(&mut self, manifest: StateManifest, bytes: Arc<Vec<u8>>, chunks: ChunkList) {
        self.set_state_bytes(manifest, BlobBytes::Memory(bytes), chunks);
    }

    /// [`BlobStore::set_state`] for a state in memory or in a file.
    pub fn set_state_bytes(
        &mut self,
        manifest: StateManifest,
        bytes: BlobBytes,
        chunks: ChunkList,
    ) {
        let hash = chunks.blob_hash();
        if let Some((_, old_hash)) = self.state.take()
            && old_hash != hash
            && let Some(older) = self.previous_state.replace(old_hash)
            && older != hash
        {
            self.remove(&older);
        }
        self.insert_bytes(manifest.round, bytes, chunks);
        self.state = Some((manifest, hash));
    }

    /// The state manifest served to late joiners.
    pub fn state(&self) -> Option<&StateManifest> {
        self.state.as_ref().map(|(m, _)| m)
    }

    fn remove(&mut self, hash: &BlobHash) {
        if let Some(blob) = self.blobs.remove(hash) {
            self.lists.remove(&blob.chunks.hash());
        }
    }

    /// Drops deltas of rounds before `round` (the served states stay).
    pub fn forget_before(&mut self, round: u64) {
        let keep_state = self.state.as_ref().map(|(_, h)| *h);
        let keep_previous = self.previous_state;
        let old: Vec<BlobHash> = self
            .blobs
            .iter()
            .filter(|(h, b)| {
                b.round < round && Some(**h) != keep_state && Some(**h) != keep_previous
            })
            .map(|(h, _)| *h)
            .collect();
        for hash in old {
            self.remove(&hash);
        }
    }

    /// Number of blobs and their total size.
    pub fn usage(&self) -> (usize, u64) {
        (
            self.blobs.len(),
            self.blobs.values().map(|b| b.bytes.len()).sum(),
        )
    }

    /// When a peer last got something other than `NotFound` from [`BlobStore::answer`]: a
    /// finished node keeps serving until peers stop fetching.
    pub fn last_served(&self) -> Option<Instant> {
        self.last_served
    }

    /// Chunks served and `Busy` answers given since start.
    pub fn served_counts(&self) -> (u64, u64) {
        (self.served_chunks, self.busy_answers)
    }

    /// Peers pulling state chunks from this node now.
    pub fn state_uploaders(&self) -> usize {
        let now = Instant::now();
        self.state_uploads
            .values()
            .filter(|t| now.duration_since(**t) < UPLOAD_IDLE)
            .count()
    }

    /// The answer to `peer`'s request, a file chunk read here (blocking; the event loop
    /// uses [`BlobStore::serve`] and reads file chunks off the swarm task).
    pub fn answer(&mut self, peer: PeerId, request: &ChunkRequest, mesh: &str) -> ChunkResponse {
        self.serve(peer, request, mesh).into_response_blocking()
    }

    /// What answering `peer`'s request takes (see [`Served`]). A file chunk counts as served
    /// when it is handed out, before it is read.
    pub fn serve(&mut self, peer: PeerId, request: &ChunkRequest, mesh: &str) -> Served {
        if let ChunkRequest::Chunk { blob_hash, .. } = request
            && (self.state.as_ref().is_some_and(|(_, h)| h == blob_hash)
                || self.previous_state == Some(*blob_hash))
            && self.contains(blob_hash)
        {
            let now = Instant::now();
            self.state_uploads
                .retain(|_, t| now.duration_since(*t) < UPLOAD_IDLE);
            if self.max_state_uploads > 0
                && !self.state_uploads.contains_key(&peer)
                && self.state_uploads.len() >= self.max_state_uploads
            {
                self.busy_answers += 1;
                return Served::Response(ChunkResponse::Busy);
            }
            self.state_uploads.insert(peer, now);
        }
        let served = match request {
            ChunkRequest::LinkDelta {
                mesh_id,
                round,
                copy,
            } => Served::Response(self.link_answer(peer, mesh_id, *round, *copy, mesh)),
            _ => self.lookup(request, mesh),
        };
        if matches!(served, Served::Chunk(_) | Served::FileChunk(_)) {
            self.served_chunks += 1;
        }
        if !matches!(
            served,
            Served::Response(ChunkResponse::NotFound | ChunkResponse::Busy)
        ) {
            self.last_served = Some(Instant::now());
        }
        served
    }

    fn lookup(&self, request: &ChunkRequest, mesh: &str) -> Served {
        let response = match request {
            ChunkRequest::CurrentManifest { mesh_id, round } => round
                .and_then(|r| self.manifests.get(&r))
                .or_else(|| self.manifests.values().next_back())
                .filter(|m| m.mesh_id == *mesh_id && mesh_id == mesh)
                .map_or(ChunkResponse::NotFound, |m| {
                    ChunkResponse::Manifest(m.clone())
                }),
            ChunkRequest::ChunkList { chunk_list_hash } => self
                .lists
                .get(chunk_list_hash)
                .and_then(|h| self.blobs.get(h))
                .map_or(ChunkResponse::NotFound, |b| {
                    ChunkResponse::ChunkList(b.chunks.clone())
                }),
            ChunkRequest::Chunk {
                blob_hash,
                index,
                chunk_hash,
            } => return self.chunk(blob_hash, *index, chunk_hash),
            ChunkRequest::LatestState { mesh_id } => match &self.state {
                Some((manifest, _)) if manifest.mesh_id == *mesh_id && mesh_id == mesh => {
                    ChunkResponse::State(manifest.clone())
                }
                _ => ChunkResponse::NotFound,
            },
            // Answered by `link_answer` (it records the requester's copy).
            ChunkRequest::LinkDelta { .. } => ChunkResponse::NotFound,
        };
        Served::Response(response)
    }

    /// Chunk `index` of a held blob whose list names `chunk_hash` there: a slice of the blob
    /// in memory, or a range of its file still to read.
    fn chunk(&self, blob_hash: &BlobHash, index: u64, chunk_hash: &ChunkHash) -> Served {
        let not_found = Served::Response(ChunkResponse::NotFound);
        let Some(blob) = self.blobs.get(blob_hash) else {
            return not_found;
        };
        let expected = usize::try_from(index)
            .ok()
            .and_then(|i| blob.chunks.chunk_hashes().get(i));
        if expected != Some(chunk_hash) {
            return not_found;
        }
        let Some(range) = blob.chunks.chunk_range(index) else {
            return not_found;
        };
        match &blob.bytes {
            BlobBytes::Memory(bytes) => {
                let (Ok(start), Ok(end)) =
                    (usize::try_from(range.start), usize::try_from(range.end))
                else {
                    return not_found;
                };
                if end > bytes.len() {
                    return not_found;
                }
                Served::Chunk(Bytes::from_owner(SharedBlob(Arc::clone(bytes))).slice(start..end))
            }
            BlobBytes::File(file) => Served::FileChunk(FileChunk {
                file: Arc::clone(file),
                range,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtune_protocol::chunk_blob;

    /// A gossip puller gets the q for the copy it names when this round has one, else the q
    /// from the anchor; nothing before the round is published or for another mesh; and it is
    /// then taken to hold the copy its q leaves, up to [`MAX_LINK_HOLDERS`] pullers.
    #[test]
    fn link_deltas_follow_the_pullers_copy_or_fall_back_to_the_anchor() {
        let manifest = |base: u8| DeltaManifest {
            mesh_id: "m".into(),
            round: 5,
            base_model: ModelHash([base; 32]),
            sender: vec![1, 2, 3],
            sample_count: 1,
            training_steps: 1,
            blob: chunk_blob(&[base; 10], 4).expect("chunks").descriptor(),
            tensors: Vec::new(),
        };
        let (anchor, known, after_anchor, after_known) = (
            ModelHash([0; 32]),
            ModelHash([7; 32]),
            ModelHash([10; 32]),
            ModelHash([17; 32]),
        );
        let mut store = BlobStore::default();
        let ask = |round: u64, copy: Option<ModelHash>| ChunkRequest::LinkDelta {
            mesh_id: "m".into(),
            round,
            copy,
        };
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(store.answer(a, &ask(5, None), "m"), ChunkResponse::NotFound);
        store.set_link_offers(LinkOffers {
            round: 5,
            anchor,
            by_copy: HashMap::from([
                (anchor, (manifest(0), after_anchor)),
                (known, (manifest(7), after_known)),
            ]),
        });
        assert_eq!(
            store.answer(a, &ask(6, None), "m"),
            ChunkResponse::NotFound,
            "round 6 is not out"
        );
        assert_eq!(
            store.answer(a, &ask(5, None), "x"),
            ChunkResponse::NotFound,
            "another mesh"
        );
        assert!(store.link_holders().is_empty(), "nothing served yet");
        assert_eq!(
            store.answer(a, &ask(5, Some(known)), "m"),
            ChunkResponse::Manifest(manifest(7))
        );
        // An unknown copy and no copy both get the q from the anchor; a lagging puller (round 3)
        // gets this round's.
        assert_eq!(
            store.answer(b, &ask(3, Some(ModelHash([9; 32]))), "m"),
            ChunkResponse::Manifest(manifest(0))
        );
        assert_eq!(
            store.link_holders(),
            HashMap::from([(a, after_known), (b, after_anchor)])
        );
        store.retain_link_holders(|p| *p != b);
        assert_eq!(store.link_holders(), HashMap::from([(a, after_known)]));
        // A crowd of identities: only MAX_LINK_HOLDERS are tracked, all are served.
        for _ in 0..2 * MAX_LINK_HOLDERS {
            assert!(matches!(
                store.answer(PeerId::random(), &ask(5, None), "m"),
                ChunkResponse::Manifest(_)
            ));
        }
        assert_eq!(store.link_holders().len(), MAX_LINK_HOLDERS);
    }

    #[test]
    fn serves_chunks_by_hash_and_forgets_old_rounds() {
        let mut store = BlobStore::default();
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let list = chunk_blob(&bytes, 300).expect("chunks");
        store.insert(3, Arc::new(bytes.clone()), list.clone());
        assert!(store.last_served().is_none());
        let peer = PeerId::random();
        let answer = store.answer(
            peer,
            &ChunkRequest::ChunkList {
                chunk_list_hash: list.hash(),
            },
            "m",
        );
        assert_eq!(answer, ChunkResponse::ChunkList(list.clone()));
        let served = store.last_served().expect("a served list counts");
        let chunk = store.answer(
            peer,
            &ChunkRequest::Chunk {
                blob_hash: list.blob_hash(),
                index: 1,
                chunk_hash: list.chunk_hashes()[1],
            },
            "m",
        );
        assert_eq!(chunk, ChunkResponse::Chunk(bytes[300..600].to_vec()));
        // Wrong chunk hash or index: not found, never a wrong chunk.
        let wrong = store.answer(
            peer,
            &ChunkRequest::Chunk {
                blob_hash: list.blob_hash(),
                index: 2,
                chunk_hash: list.chunk_hashes()[1],
            },
            "m",
        );
        assert_eq!(wrong, ChunkResponse::NotFound);
        let beyond = store.answer(
            peer,
            &ChunkRequest::Chunk {
                blob_hash: list.blob_hash(),
                index: 99,
                chunk_hash: list.chunk_hashes()[1],
            },
            "m",
        );
        assert_eq!(beyond, ChunkResponse::NotFound);
        assert!(
            store.last_served().expect("served") >= served,
            "a NotFound answer is not serving"
        );
        store.forget_before(4);
        assert!(!store.contains(&list.blob_hash()));
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn the_previous_state_stays_servable_until_the_next_one() {
        let mut store = BlobStore::default();
        let state = |round: u64| {
            let bytes: Vec<u8> = (0..500u32).map(|i| (i as u64 * 7 + round) as u8).collect();
            let list = chunk_blob(&bytes, 200).expect("chunks");
            let manifest = StateManifest {
                mesh_id: "m".into(),
                round,
                model_hash: meshtune_protocol::ModelHash([round as u8; 32]),
                sender: Vec::new(),
                training_steps: 0,
                blob: list.descriptor(),
                model: Vec::new(),
                optimizer: Vec::new(),
            };
            (manifest, bytes, list)
        };
        let (m1, b1, l1) = state(1);
        let (m2, b2, l2) = state(2);
        let (m3, b3, l3) = state(3);
        store.set_state(m1, Arc::new(b1), l1.clone());
        store.set_state(m2, Arc::new(b2), l2.clone());
        store.forget_before(10);
        assert!(
            store.contains(&l1.blob_hash()),
            "a sync of state 1 in flight can finish"
        );
        assert!(store.contains(&l2.blob_hash()));
        assert_eq!(store.state().map(|m| m.round), Some(2));
        store.set_state(m3, Arc::new(b3), l3.clone());
        assert!(
            !store.contains(&l1.blob_hash()),
            "only one previous state is kept"
        );
        assert!(store.contains(&l2.blob_hash()) && store.contains(&l3.blob_hash()));
    }

    #[test]
    fn a_donor_serves_state_chunks_to_a_capped_number_of_peers() {
        let mut store = BlobStore::with_max_state_uploads(2);
        let bytes: Vec<u8> = (0..900u32).map(|i| (i % 253) as u8).collect();
        let list = chunk_blob(&bytes, 300).expect("chunks");
        let manifest = StateManifest {
            mesh_id: "m".into(),
            round: 1,
            model_hash: meshtune_protocol::ModelHash([1; 32]),
            sender: Vec::new(),
            training_steps: 0,
            blob: list.descriptor(),
            model: Vec::new(),
            optimizer: Vec::new(),
        };
        store.set_state(manifest, Arc::new(bytes), list.clone());
        // A delta is never capped.
        let delta: Vec<u8> = vec![7; 400];
        let delta_list = chunk_blob(&delta, 300).expect("chunks");
        store.insert(1, Arc::new(delta), delta_list.clone());
        let chunk = |index: u64, list: &ChunkList| ChunkRequest::Chunk {
            blob_hash: list.blob_hash(),
            index,
            chunk_hash: list.chunk_hashes()[index as usize],
        };
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(matches!(
            store.answer(a, &chunk(0, &list), "m"),
            ChunkResponse::Chunk(_)
        ));
        assert!(matches!(
            store.answer(b, &chunk(1, &list), "m"),
            ChunkResponse::Chunk(_)
        ));
        assert_eq!(store.state_uploaders(), 2);
        // A third downloader waits; the two admitted ones go on.
        assert_eq!(store.answer(c, &chunk(2, &list), "m"), ChunkResponse::Busy);
        assert!(matches!(
            store.answer(a, &chunk(2, &list), "m"),
            ChunkResponse::Chunk(_)
        ));
        assert!(matches!(
            store.answer(c, &chunk(0, &delta_list), "m"),
            ChunkResponse::Chunk(_)
        ));
        // The state manifest itself is always answered.
        assert!(matches!(
            store.answer(
                c,
                &ChunkRequest::LatestState {
                    mesh_id: "m".into()
                },
                "m"
            ),
            ChunkResponse::State(_)
        ));
    }
}
