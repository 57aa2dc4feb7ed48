//! Arbitrary bytes as the builtin VMM's snapshot state file: the seal, checksum, layout and
//! decoding a restore runs before it trusts any of it. A corrupt file is an error, never a
//! crash or an allocation the file's size does not justify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::snapshot::validate_state(data);
    // The same bytes behind a valid seal: the checksum passes and the decoder gets them.
    let _ = vmm::snapshot::validate_state(&snapshot::file::seal(data));
});
