//! The blob decoder behind a valid-looking manifest: `u16 manifest length`, manifest, blob.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshtune_protocol::fuzz_harness::delta_blob(data);
});
