//! Every wire message: round trip, canonical encoding, and hostile bytes never panic.

mod common;

use common::{delta_manifest, mutate, mutations, state_manifest};
use meshtune_protocol::{
    BlobHash, ChunkHash, ChunkList, ChunkListHash, ChunkRequest, ChunkResponse, DeltaManifest,
    Limits, MessageKind, ModelHash, StateManifest, WireError, chunk_blob,
};
use proptest::prelude::*;

fn chunk_request() -> impl Strategy<Value = ChunkRequest> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|hash| ChunkRequest::ChunkList {
            chunk_list_hash: ChunkListHash(hash)
        }),
        (any::<[u8; 32]>(), 0u64..(1 << 16), any::<[u8; 32]>()).prop_map(|(blob, index, chunk)| {
            ChunkRequest::Chunk {
                blob_hash: BlobHash(blob),
                index,
                chunk_hash: ChunkHash(chunk),
            }
        }),
        "[a-z0-9-]{0,64}".prop_map(|mesh_id| ChunkRequest::LatestState { mesh_id }),
        ("[a-z0-9-]{0,64}", proptest::option::of(0u64..u64::MAX))
            .prop_map(|(mesh_id, round)| ChunkRequest::CurrentManifest { mesh_id, round }),
        (
            "[a-z0-9-]{0,64}",
            any::<u64>(),
            proptest::option::of(any::<[u8; 32]>())
        )
            .prop_map(|(mesh_id, round, copy)| ChunkRequest::LinkDelta {
                mesh_id,
                round,
                copy: copy.map(ModelHash),
            }),
    ]
}

fn chunk_list() -> impl Strategy<Value = ChunkList> {
    (proptest::collection::vec(any::<u8>(), 0..3000), 1u32..700).prop_map(|(blob, chunk_size)| {
        chunk_blob(&blob, chunk_size).expect("chunk size is positive")
    })
}

fn chunk_response() -> impl Strategy<Value = ChunkResponse> {
    prop_oneof![
        chunk_list().prop_map(ChunkResponse::ChunkList),
        proptest::collection::vec(any::<u8>(), 0..3000).prop_map(ChunkResponse::Chunk),
        state_manifest().prop_map(ChunkResponse::State),
        delta_manifest().prop_map(ChunkResponse::Manifest),
        Just(ChunkResponse::NotFound),
        Just(ChunkResponse::Busy),
    ]
}

/// Decodes with every decoder; accepted messages must re-encode to the same bytes.
fn decode_everything(bytes: &[u8]) {
    meshtune_protocol::fuzz_harness::wire_messages(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn delta_manifest_round_trips(manifest in delta_manifest()) {
        let limits = Limits::default();
        let bytes = manifest.encode(&limits).expect("valid manifest encodes");
        prop_assert_eq!(DeltaManifest::decode(&bytes, &limits), Ok(manifest.clone()));
        prop_assert_eq!(manifest.encode(&limits).expect("encodes"), bytes);
    }

    #[test]
    fn state_manifest_round_trips(manifest in state_manifest()) {
        let limits = Limits::default();
        let bytes = manifest.encode(&limits).expect("valid manifest encodes");
        prop_assert_eq!(StateManifest::decode(&bytes, &limits), Ok(manifest));
    }

    #[test]
    fn chunk_list_round_trips(list in chunk_list()) {
        let limits = Limits::default();
        let bytes = list.encode();
        prop_assert_eq!(ChunkList::decode(&bytes, &limits), Ok(list.clone()));
        prop_assert!(list.verify_against(&list.descriptor()).is_ok());
        prop_assert_eq!(list.hash(), ChunkListHash::of_bytes(&bytes));
    }

    #[test]
    fn chunk_request_round_trips(request in chunk_request()) {
        let limits = Limits::default();
        let bytes = request.encode(&limits).expect("valid request encodes");
        prop_assert!(bytes.len() <= ChunkRequest::max_encoded_len(&limits));
        prop_assert_eq!(ChunkRequest::decode(&bytes, &limits), Ok(request));
    }

    #[test]
    fn chunk_response_round_trips(response in chunk_response()) {
        let limits = Limits::default();
        let bytes = response.encode(&limits).expect("valid response encodes");
        prop_assert!(bytes.len() <= limits.max_response_bytes());
        prop_assert_eq!(ChunkResponse::decode(&bytes, &limits), Ok(response));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4000)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        kind in prop_oneof![
            Just(MessageKind::DeltaManifest),
            Just(MessageKind::StateManifest),
            Just(MessageKind::ChunkList),
            Just(MessageKind::ChunkRequest),
            Just(MessageKind::ChunkResponse),
        ],
        body in proptest::collection::vec(any::<u8>(), 0..4000),
    ) {
        let mut bytes = kind.magic().to_vec();
        bytes.extend_from_slice(&meshtune_protocol::FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&body);
        decode_everything(&bytes);
    }

    #[test]
    fn damaged_manifests_never_panic(manifest in delta_manifest(), damage in mutations()) {
        let bytes = manifest.encode(&Limits::default()).expect("valid manifest encodes");
        decode_everything(&mutate(bytes, &damage));
    }

    #[test]
    fn damaged_state_manifests_never_panic(manifest in state_manifest(), damage in mutations()) {
        let bytes = manifest.encode(&Limits::default()).expect("valid manifest encodes");
        decode_everything(&mutate(bytes, &damage));
    }

    #[test]
    fn damaged_responses_and_requests_never_panic(
        response in chunk_response(),
        request in chunk_request(),
        damage in mutations(),
    ) {
        let limits = Limits::default();
        decode_everything(&mutate(response.encode(&limits).expect("encodes"), &damage));
        decode_everything(&mutate(request.encode(&limits).expect("encodes"), &damage));
    }
}

#[test]
fn unknown_versions_are_refused_with_a_clear_error() {
    let limits = Limits::default();
    let request = ChunkRequest::LatestState {
        mesh_id: "m".into(),
    };
    let mut bytes = request.encode(&limits).expect("encodes");
    bytes[4..6].copy_from_slice(&2u16.to_le_bytes());
    let error = ChunkRequest::decode(&bytes, &limits).expect_err("version 2 is unknown");
    assert_eq!(
        error,
        WireError::UnsupportedVersion {
            kind: MessageKind::ChunkRequest,
            found: 2,
            supported: 1
        }
    );
    assert_eq!(
        error.to_string(),
        "chunk request has format version 2, this build only reads version 1: \
         upgrade meshtune or ask the sender to downgrade"
    );
}

#[test]
fn oversized_messages_are_refused_before_parsing() {
    let limits = Limits {
        max_manifest_bytes: 100,
        ..Limits::default()
    };
    let bytes = vec![0u8; 101];
    assert!(matches!(
        DeltaManifest::decode(&bytes, &limits),
        Err(WireError::MessageTooLarge {
            len: 101,
            cap: 100,
            ..
        })
    ));
    let chunk = ChunkResponse::Chunk(vec![0; 17]);
    let small = Limits {
        max_chunk_size: 16,
        ..Limits::default()
    };
    assert!(matches!(
        chunk.encode(&small),
        Err(WireError::OverCap { field: "chunk", .. })
    ));
    let bytes = chunk.encode(&Limits::default()).expect("encodes");
    assert!(matches!(
        ChunkResponse::decode(&bytes, &small),
        Err(WireError::OverCap { field: "chunk", .. })
    ));
}

#[test]
fn counts_over_caps_are_refused_before_allocating() {
    // A chunk list claiming 2^40 bytes in 1-byte chunks: refused on the count, not by
    // running out of memory.
    let mut bytes = MessageKind::ChunkList.magic().to_vec();
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x20]); // 2^40
    bytes.push(1);
    let limits = Limits {
        max_blob_size: u64::MAX,
        ..Limits::default()
    };
    assert!(matches!(
        ChunkList::decode(&bytes, &limits),
        Err(WireError::OverCap {
            field: "chunk count",
            ..
        })
    ));
}

#[test]
fn manifest_strategy_is_not_trivial() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut tensors, mut sparse, mut zstd, mut bytes) = (0, 0, 0, 0);
    for _ in 0..200 {
        let manifest = delta_manifest()
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        tensors += manifest.tensors.len();
        sparse += manifest
            .tensors
            .iter()
            .filter(|entry| entry.encoding.kept.is_some())
            .count();
        zstd += manifest
            .tensors
            .iter()
            .filter(|entry| entry.encoding.zstd)
            .count();
        bytes += manifest.encode(&Limits::default()).expect("encodes").len();
    }
    assert!(
        tensors > 600 && sparse > 200 && zstd > 200,
        "{tensors} {sparse} {zstd}"
    );
    assert!(bytes > 200 * 100, "{bytes}");
}
