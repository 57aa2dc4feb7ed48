//! Arbitrary bytes as a sequence of FUSE requests to a server over a temporary share: each
//! request's length is its header's `len` (bounded by what is left), so the fuzzer reaches
//! deep states (INIT, LOOKUP, OPEN, then IO on the handle) and the decoder's every check.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use share::{Server, ShareSpec};

struct Fixture {
    server: Server,
}

/// The shared tree, made afresh by each run in the fuzz crate's own target directory (the
/// server lives as long as the process, so a temporary directory would outlive its guard).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/share-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).expect("d");
        std::fs::write(dir.join("d/f"), b"fuzz").expect("f");
        std::os::unix::fs::symlink("/etc/shadow", dir.join("s")).expect("s");
        let server = Server::new(vec![
            ShareSpec {
                source: dir.clone(),
                read_only: false,
                joined_with: None,
            },
            ShareSpec {
                source: dir.join("d/f"),
                read_only: true,
                joined_with: None,
            },
        ])
        .expect("server");
        Fixture { server }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let mut rest = data;
    while !rest.is_empty() {
        let len = match rest.get(0..4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => rest.len(),
        };
        let len = len.clamp(1, rest.len());
        let (request, tail) = rest.split_at(len);
        if let Some(reply) = fixture.server.handle(request) {
            let reply_len = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
            assert_eq!(reply_len, reply.len(), "a reply's header frames it exactly");
        }
        rest = tail;
    }
});
