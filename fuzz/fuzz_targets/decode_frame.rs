//! Feeds arbitrary bytes to the frame decoder and the handshake parser: they must
//! return frames or errors, never panic, and every decoded frame must re-encode to the
//! bytes it came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netbore_protocol::{AgentHello, EdgeReply, decode, encode};

fuzz_target!(|data: &[u8]| {
    for max in [64usize, netbore_protocol::frame::DEFAULT_MAX_FRAME_LEN] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.clone();
            match decode(&mut buf, max) {
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    let mut re = BytesMut::new();
                    encode(&frame, &mut re);
                    assert_eq!(&re[..], &before[..used], "re-encoding differs");
                }
                Ok(None) | Err(_) => {
                    assert_eq!(buf, before, "a failed decode consumed bytes");
                    break;
                }
            }
        }
    }
    let _ = serde_json::from_slice::<AgentHello>(data);
    let _ = serde_json::from_slice::<EdgeReply>(data);
});
