//! Feeds arbitrary bytes to the agent link's WebSocket frame decoder and its fragment
//! reassembly, as either end (masked or not) and under three limits: they must return
//! frames, messages or errors, never panic; every decoded frame must re-encode (header,
//! then the payload masked again with its key) to exactly the bytes it came from; a
//! partial frame or an error must consume nothing, and a partial frame must say it
//! needs more bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use netbore_protocol::ws::{MAX_HEADER_LEN, Reassembly, apply_mask, decode, encode_header, needed};

fuzz_target!(|data: &[u8]| {
    for masked in [false, true] {
        // 0: only empty payloads; 125: control-sized; 1 MiB: the link's message limit.
        for max in [0, 125, 1 << 20] {
            let mut buf = BytesMut::from(data);
            let mut joined = Reassembly::default();
            loop {
                let before = buf.clone();
                match decode(&mut buf, masked, max) {
                    Ok(Some(frame)) => {
                        let used = before.len() - buf.len();
                        assert!(frame.payload.len() <= max);
                        assert_eq!(frame.mask.is_some(), masked);
                        let mut head = [0; MAX_HEADER_LEN];
                        let n = encode_header(
                            &mut head,
                            frame.fin,
                            frame.opcode,
                            frame.payload.len(),
                            frame.mask,
                        );
                        let mut re = head[..n].to_vec();
                        let mut p = frame.payload.to_vec();
                        if let Some(k) = frame.mask {
                            apply_mask(&mut p, k);
                        }
                        re.extend_from_slice(&p);
                        assert_eq!(&re[..], &before[..used], "re-encoding differs");
                        if joined.push(frame, max).is_err() {
                            break;
                        }
                    }
                    Ok(None) => {
                        assert_eq!(buf, before, "a partial frame was consumed");
                        assert!(needed(&buf, masked, max) >= 1);
                        break;
                    }
                    Err(_) => {
                        assert_eq!(buf, before, "a failed decode consumed bytes");
                        break;
                    }
                }
            }
        }
    }
});
