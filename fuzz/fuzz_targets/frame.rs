//! Arbitrary bytes through both ends' frame decoders, as they arrive from a peer: the host's
//! (agent messages) and the agent's (host messages), whole and split at every point the
//! input's first byte picks. Whatever the bytes, a decoder returns frames or an error, and the
//! two ways of feeding it agree.
#![no_main]

use agent_proto::{AgentMessage, FrameDecoder, HostMessage};
use libfuzzer_sys::fuzz_target;

/// Every frame `bytes` decode to, fed in pieces of `step` bytes, as text (or the error).
fn decode<M: serde::de::DeserializeOwned + std::fmt::Debug>(
    bytes: &[u8],
    step: usize,
) -> Vec<String> {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        decoder.push(piece);
        loop {
            match decoder.next_frame::<M>() {
                Ok(Some(frame)) => frames.push(format!("{frame:?}")),
                Ok(None) => break,
                Err(e) => {
                    frames.push(format!("error: {e}"));
                    return frames;
                }
            }
        }
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(split) + 1;
    assert_eq!(
        decode::<AgentMessage>(bytes, bytes.len().max(1)),
        decode::<AgentMessage>(bytes, step)
    );
    assert_eq!(
        decode::<HostMessage>(bytes, bytes.len().max(1)),
        decode::<HostMessage>(bytes, step)
    );
    let mut reader = bytes;
    let _ = agent_proto::read_frame::<AgentMessage, _>(&mut reader);
});
