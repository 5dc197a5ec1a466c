//! The blobs this node can serve: its own deltas, every delta it fetched and verified (so
//! peers can pull from any node that has one, not only the announcer), and its latest state
//! for late joiners.
//!
//! Owns: the in-memory blob table and the answers to [`ChunkRequest`]s. Must not touch:
//! the network (the event loop calls [`BlobStore::answer`]) or validation of what goes in
//! (callers insert only verified blobs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use meshtune_protocol::{
    BlobHash, ChunkList, ChunkListHash, ChunkRequest, ChunkResponse, StateManifest,
};

#[derive(Debug)]
struct StoredBlob {
    round: u64,
    bytes: Arc<Vec<u8>>,
    chunks: ChunkList,
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
}

impl BlobStore {
    /// Adds a verified blob of `round` with its chunk list.
    pub fn insert(&mut self, round: u64, bytes: Arc<Vec<u8>>, chunks: ChunkList) {
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
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.blobs.contains_key(hash)
    }

    /// The blob's bytes, if held.
    pub fn get(&self, hash: &BlobHash) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(hash).map(|b| Arc::clone(&b.bytes))
    }

    /// Serves `manifest` (and its blob, inserted under its round) to late joiners.
    pub fn set_state(&mut self, manifest: StateManifest, bytes: Arc<Vec<u8>>, chunks: ChunkList) {
        let hash = chunks.blob_hash();
        if let Some((_, old_hash)) = self.state.take()
            && old_hash != hash
            && let Some(older) = self.previous_state.replace(old_hash)
            && older != hash
        {
            self.remove(&older);
        }
        self.insert(manifest.round, bytes, chunks);
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
            self.blobs.values().map(|b| b.bytes.len() as u64).sum(),
        )
    }

    /// When a peer last got something other than `NotFound` from [`BlobStore::answer`]: a
    /// finished node keeps serving until peers stop fetching.
    pub fn last_served(&self) -> Option<Instant> {
        self.last_served
    }

    /// The answer to a peer's request.
    pub fn answer(&mut self, request: &ChunkRequest, mesh: &str) -> ChunkResponse {
        let response = self.lookup(request, mesh);
        if !matches!(response, ChunkResponse::NotFound) {
            self.last_served = Some(Instant::now());
        }
        response
    }

    fn lookup(&self, request: &ChunkRequest, mesh: &str) -> ChunkResponse {
        match request {
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
            } => {
                let Some(blob) = self.blobs.get(blob_hash) else {
                    return ChunkResponse::NotFound;
                };
                let expected = usize::try_from(*index)
                    .ok()
                    .and_then(|i| blob.chunks.chunk_hashes().get(i));
                match (expected, blob.chunks.chunk(&blob.bytes, *index)) {
                    (Some(h), Some(bytes)) if h == chunk_hash => {
                        ChunkResponse::Chunk(bytes.to_vec())
                    }
                    _ => ChunkResponse::NotFound,
                }
            }
            ChunkRequest::LatestState { mesh_id } => match &self.state {
                Some((manifest, _)) if manifest.mesh_id == *mesh_id && mesh_id == mesh => {
                    ChunkResponse::State(manifest.clone())
                }
                _ => ChunkResponse::NotFound,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtune_protocol::chunk_blob;

    #[test]
    fn serves_chunks_by_hash_and_forgets_old_rounds() {
        let mut store = BlobStore::default();
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let list = chunk_blob(&bytes, 300).expect("chunks");
        store.insert(3, Arc::new(bytes.clone()), list.clone());
        assert!(store.last_served().is_none());
        let answer = store.answer(
            &ChunkRequest::ChunkList {
                chunk_list_hash: list.hash(),
            },
            "m",
        );
        assert_eq!(answer, ChunkResponse::ChunkList(list.clone()));
        let served = store.last_served().expect("a served list counts");
        let chunk = store.answer(
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
            &ChunkRequest::Chunk {
                blob_hash: list.blob_hash(),
                index: 2,
                chunk_hash: list.chunk_hashes()[1],
            },
            "m",
        );
        assert_eq!(wrong, ChunkResponse::NotFound);
        let beyond = store.answer(
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
}
