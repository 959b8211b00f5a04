//! Feeds arbitrary bytes to the frame decoder and the handshake parser: they must
//! return frames or errors, never panic; every decoded frame must re-encode to exactly
//! the bytes it came from; a failed decode must consume nothing; and any handshake
//! message that parses must survive a JSON round trip.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netbore_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use netbore_protocol::{AgentHello, EdgeReply, decode, encode};

fuzz_target!(|data: &[u8]| {
    // 0: only empty payloads; 64: most payloads too large; the default: everything.
    for max in [0, 64, DEFAULT_MAX_FRAME_LEN] {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.clone();
            match decode(&mut buf, max) {
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    assert!(used > 0 && used - netbore_protocol::frame::FRAME_HEADER_LEN <= max);
                    assert_eq!(used, frame.encoded_len(), "encoded_len disagrees");
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

    // The edge parses the hello from a text message and the agent parses the reply.
    if let Ok(hello) = serde_json::from_slice::<AgentHello>(data) {
        let again = serde_json::to_string(&hello).expect("a hello serialises");
        assert_eq!(serde_json::from_str::<AgentHello>(&again).ok(), Some(hello));
    }
    if let Ok(reply) = serde_json::from_slice::<EdgeReply>(data) {
        let again = serde_json::to_string(&reply).expect("a reply serialises");
        assert_eq!(serde_json::from_str::<EdgeReply>(&again).ok(), Some(reply));
    }
});
