//! Feeds arbitrary message sequences to one `conn::Connection`, interleaved with the
//! local operations its driver performs (open, send, consume, reset, go-away, timers):
//! it must never panic, every frame it writes must encode and decode back to itself,
//! and what it holds stays bounded (streams within the concurrency limit, heads within
//! their budget, unread data within the connection window, its transmit queue within
//! `MAX_QUEUED_FRAMES` plus what the driver itself asked it to send).
//!
//! Input: byte 0 picks the role and the limits; then a sequence of operations, each an
//! op byte and, for a message, a 16-bit length and that many bytes (decoded by the
//! connection with the real decoder).
#![no_main]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use netbore_protocol::conn::{Config, Connection, Event, MAX_QUEUED_FRAMES, Role};
use netbore_protocol::{Header, Limits, RequestHead, ResetCode, ResponseHead, decode, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    let role = if setup & 1 == 0 {
        Role::Edge
    } else {
        Role::Agent
    };
    let limits = if setup & 2 == 0 {
        Limits {
            max_frame_len: 4096,
            initial_stream_window: 1000,
            connection_window: 2500,
            max_concurrent_streams: 4,
        }
    } else {
        Limits {
            max_concurrent_streams: 16,
            ..Limits::default()
        }
    };
    let cfg = Config {
        max_head_bytes: 16 * 1024,
        ..Config::new(role, limits, Duration::from_secs(1))
    };
    let mut c = Connection::new(cfg, Duration::ZERO);
    let mut now = Duration::ZERO;
    let mut ids: Vec<u32> = Vec::new();
    let mut unread: Vec<(u32, usize)> = Vec::new();
    let mut local_frames = 0usize;

    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let arg = usize::from(op >> 3);
        let pick = |ids: &[u32]| ids.get(arg % ids.len().max(1)).copied().unwrap_or(1);
        match op & 7 {
            0 | 1 => {
                // A message from the peer.
                if rest.len() < 2 {
                    break;
                }
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
                let msg = Bytes::copy_from_slice(&rest[2..2 + len]);
                rest = &rest[2 + len..];
                let r = c.handle_message(now, msg);
                if let Err(e) = r {
                    assert!(c.is_closed(), "an error that left the connection open: {e}");
                    assert!(!e.to_string().is_empty());
                }
            }
            2 => {
                now += Duration::from_millis(arg as u64 * 97);
                c.handle_timeout(now);
                if let Some(t) = c.poll_timeout() {
                    assert!(t > now, "a timeout not after the time just handled");
                }
            }
            3 => match role {
                Role::Edge => {
                    let head = RequestHead {
                        method: "GET".into(),
                        target: format!("/{arg}"),
                        headers: vec![Header::new("host", "fuzz.test")],
                    };
                    if let Ok(id) = c.open(now, head, arg % 2 == 0) {
                        ids.push(id);
                        local_frames += 1;
                    }
                }
                Role::Agent => {
                    let id = pick(&ids);
                    let head = ResponseHead {
                        status: 200,
                        headers: Vec::new(),
                    };
                    if c.send_response(now, id, head, arg % 2 == 0).is_ok() {
                        local_frames += 1;
                    }
                }
            },
            4 => {
                let id = pick(&ids);
                let mut body = Bytes::from(vec![0xab; arg * 100]);
                if let Ok(n) = c.send_data(now, id, &mut body, arg % 3 == 0) {
                    local_frames += n / 1000 + 2;
                }
            }
            5 => {
                // The reader passes on what it holds.
                for (id, n) in unread.drain(..) {
                    c.consumed(now, id, n);
                    local_frames += 2;
                }
                local_frames += 2 * ids.len() + 2;
            }
            6 => {
                let id = pick(&ids);
                match arg % 4 {
                    0 => c.reset(now, id, ResetCode::Cancel, "fuzz"),
                    1 => c.stop_reading(now, id),
                    2 => c.go_away(now, "fuzz"),
                    _ => c.close("fuzz"),
                }
                local_frames += 1;
            }
            _ => {
                // The driver writes: everything the connection sends must round-trip.
                let mut buf = BytesMut::new();
                while let Some(frame) = c.poll_transmit() {
                    buf.clear();
                    encode(&frame, &mut buf);
                    let back = decode(&mut buf, limits.max_frame_len as usize)
                        .expect("a frame we send must decode")
                        .expect("whole");
                    assert_eq!(back, frame);
                }
                local_frames = 0;
            }
        }
        while let Some(ev) = c.poll() {
            match ev {
                Event::Opened { stream_id, .. } => {
                    if ids.len() < 64 {
                        ids.push(stream_id);
                    }
                }
                Event::Data { stream_id, data } => unread.push((stream_id, data.len())),
                _ => {}
            }
        }
        assert!(c.open_streams() <= limits.max_concurrent_streams as usize);
        assert!(c.head_bytes() <= 16 * 1024);
        let held: usize = unread.iter().map(|(_, n)| n).sum();
        assert!(
            held <= limits.connection_window as usize,
            "{held} unread bytes held"
        );
        assert!(c.queued_frames() <= MAX_QUEUED_FRAMES + local_frames + 2);
    }
});
