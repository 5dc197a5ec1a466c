//! Every message decoder (manifests, chunk lists, requests, responses) on arbitrary bytes;
//! accepted messages must re-encode to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshtune_protocol::fuzz_harness::wire_messages(data);
});
