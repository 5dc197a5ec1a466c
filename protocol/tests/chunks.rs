//! Blob chunking and assembly: any arrival order, every chunk verified on arrival, the
//! whole blob verified at the end.

use meshtune_protocol::{BlobAssembler, ChunkError, ChunkList, ChunkListHash, Limits, chunk_blob};
use proptest::prelude::*;

fn blob_and_order() -> impl Strategy<Value = (Vec<u8>, u32, Vec<u64>)> {
    (proptest::collection::vec(any::<u8>(), 0..5000), 1u32..900).prop_flat_map(
        |(blob, chunk_size)| {
            let count = blob.len().div_ceil(chunk_size as usize) as u64;
            let order = Just((0..count).collect::<Vec<_>>()).prop_shuffle();
            (Just(blob), Just(chunk_size), order)
        },
    )
}

proptest! {
    #[test]
    fn chunks_in_any_order_rebuild_the_blob((blob, chunk_size, order) in blob_and_order()) {
        let list = chunk_blob(&blob, chunk_size).expect("chunks");
        prop_assert_eq!(list.chunk_count(), order.len() as u64);
        let mut assembler = BlobAssembler::new(list.clone(), &Limits::default()).expect("within limits");
        for (received, &index) in order.iter().enumerate() {
            prop_assert_eq!(assembler.missing_count(), (order.len() - received) as u64);
            let chunk = list.chunk(&blob, index).expect("chunk exists");
            prop_assert_eq!(assembler.accept_chunk(index, chunk), Ok(()));
            prop_assert!(assembler.missing_chunks().all(|(missing, _)| missing != index));
            prop_assert_eq!(assembler.accept_chunk(index, chunk), Err(ChunkError::Duplicate { index }));
        }
        prop_assert!(assembler.is_complete());
        let verified = assembler.finish().expect("complete and correct");
        prop_assert_eq!(verified.hash(), list.blob_hash());
        prop_assert_eq!(verified.into_bytes(), blob);
    }

    #[test]
    fn arbitrary_chunks_never_panic_and_never_count(
        (blob, chunk_size, _) in blob_and_order(),
        attempts in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..1000)), 0..20),
    ) {
        let list = chunk_blob(&blob, chunk_size).expect("chunks");
        let mut assembler = BlobAssembler::new(list.clone(), &Limits::default()).expect("within limits");
        for (index, bytes) in attempts {
            let index = index % (list.chunk_count() + 2);
            let genuine = list.chunk(&blob, index) == Some(bytes.as_slice());
            let accepted = assembler.accept_chunk(index, &bytes).is_ok();
            // Random bytes are only accepted if they are the real chunk (a 2^-256 event
            // unless proptest generated the real chunk, e.g. an empty blob's).
            prop_assert!(!accepted || genuine);
        }
    }
}

#[test]
fn incomplete_and_inconsistent_blobs_are_rejected() {
    let blob: Vec<u8> = (0..2500u32).map(|i| (i * 7 % 251) as u8).collect();
    let list = chunk_blob(&blob, 1000).expect("chunks");
    assert_eq!(list.chunk_count(), 3);
    assert_eq!(list.chunk_range(2), Some(2000..2500));
    assert_eq!(list.chunk_range(3), None);

    let mut assembler =
        BlobAssembler::new(list.clone(), &Limits::default()).expect("within limits");
    assert_eq!(
        assembler.accept_chunk(3, &[]),
        Err(ChunkError::IndexOutOfRange { index: 3, count: 3 })
    );
    assembler
        .accept_chunk(2, list.chunk(&blob, 2).expect("last"))
        .expect("accepted");
    assert_eq!(
        assembler
            .missing_chunks()
            .map(|(index, _)| index)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(matches!(
        assembler.finish(),
        Err(ChunkError::Incomplete { missing: 2 })
    ));

    // A sender whose chunk list matches its chunks but not its announced blob hash: every
    // chunk verifies, the whole blob does not.
    let other = chunk_blob(&blob[..2499], 1000).expect("chunks");
    let forged_bytes = {
        let mut bytes = list.encode();
        bytes[6..38].copy_from_slice(other.blob_hash().as_bytes());
        bytes
    };
    let forged = ChunkList::decode(&forged_bytes, &Limits::default()).expect("well formed");
    let mut assembler = BlobAssembler::new(forged, &Limits::default()).expect("within limits");
    for index in 0..3 {
        assembler
            .accept_chunk(index, list.chunk(&blob, index).expect("chunk"))
            .expect("chunk verifies");
    }
    assert!(matches!(
        assembler.finish(),
        Err(ChunkError::BlobHashMismatch { .. })
    ));

    // A chunk list that is not the one the manifest names.
    let mut descriptor = list.descriptor();
    descriptor.chunk_list_hash = ChunkListHash::of_bytes(b"something else");
    assert!(matches!(
        list.verify_against(&descriptor),
        Err(ChunkError::ChunkListHashMismatch { .. })
    ));
    assert_eq!(chunk_blob(&blob, 0), Err(ChunkError::ZeroChunkSize));
}

#[test]
fn empty_blobs_have_no_chunks() {
    let list = chunk_blob(&[], 1 << 20).expect("chunks");
    assert_eq!(list.chunk_count(), 0);
    let assembler = BlobAssembler::new(list.clone(), &Limits::default()).expect("within limits");
    assert!(assembler.is_complete());
    assert_eq!(
        assembler.finish().expect("empty blob").as_bytes(),
        &[] as &[u8]
    );
    assert_eq!(
        ChunkList::decode(&list.encode(), &Limits::default()),
        Ok(list)
    );
}
