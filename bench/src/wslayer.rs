//! `ws-layers [ROUNDS]`: the WebSocket layers the agent link could run on, compared on
//! the link's own traffic pattern over loopback TCP, with the same layer at both ends.
//!
//! Candidates:
//! * `tungstenite` — tokio-tungstenite as the link configures it today
//!   (`netbore_mux::ws_config`); it copies each message into its write buffer.
//! * `tokio-websockets` — writes header and payload with one vectored write; as a client
//!   it masks a `Bytes` payload in place only when it holds the last reference, otherwise
//!   it copies first.
//! * `fastwebsockets` — vectored writes of a `BytesMut` payload, masked in place.
//! * `own` — RFC 6455 binary frames of our own ([`crate::wsframe`]): header and payload
//!   in one vectored write, the payload masked in place, received frames unmasked in
//!   place in the read buffer.
//!
//! Each sender produces its messages the way the mux does: frames appended to one
//! long-lived `BytesMut`, split off as the message (so the message shares its allocation
//! with the buffer, as `transmit_into` + `split` leaves it). The handshake is left out:
//! every layer takes over a connected socket as it would after the upgrade.
//!
//! Workloads (every loop bounded in count):
//! * `pingpong` — ~1.2 KiB binary messages (a W1 request or response batch), 64 in
//!   flight; the server answers each message with one of the same size.
//! * `bulk-up` — 64 KiB messages client → server (masked: the agent sending a body).
//! * `bulk-down` — 64 KiB messages server → client (unmasked: the edge sending a body).
//!
//! CPU is the process's user+system time (CLOCK_PROCESS_CPUTIME_ID, the same total
//! getrusage reports) over the run; both ends run in this process on one runtime thread,
//! so it is the cost of both ends together. Candidates run interleaved, in a rotating order, round after
//! round, so the machine's noise falls on all of them; ratios are taken against
//! tungstenite within each round, then the median over the rounds is printed.

use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::Role as TRole;

use crate::wsframe;

/// Size of one ping-pong message: a W1 request or response batch.
const SMALL: usize = 1200;
/// Messages in flight in the ping-pong.
const IN_FLIGHT: usize = 64;
/// Round trips per ping-pong run.
const ROUND_TRIPS: usize = 60_000;
/// Size of one bulk message.
const BULK: usize = 64 * 1024;
/// Messages per bulk run (1 GiB).
const BULK_MESSAGES: usize = 16 * 1024;
/// The largest message any end accepts (as the link's `MAX_*_MESSAGE`).
const MAX_MESSAGE: usize = 1024 * 1024;
/// No run may take longer than this.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Tungstenite,
    TokioWebsockets,
    FastWebsockets,
    Own,
}

const LAYERS: [Layer; 4] = [
    Layer::Tungstenite,
    Layer::TokioWebsockets,
    Layer::FastWebsockets,
    Layer::Own,
];

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Tungstenite => "tungstenite",
            Layer::TokioWebsockets => "tokio-websockets",
            Layer::FastWebsockets => "fastwebsockets",
            Layer::Own => "own",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    PingPong,
    BulkUp,
    BulkDown,
}

const WORKS: [Work; 3] = [Work::PingPong, Work::BulkUp, Work::BulkDown];

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::PingPong => "pingpong 1.2 KiB x64",
            Work::BulkUp => "bulk-up 64 KiB (masked)",
            Work::BulkDown => "bulk-down 64 KiB",
        }
    }
}

/// One end of a link, whichever layer it runs on.
enum Ws {
    Tungstenite(tokio_tungstenite::WebSocketStream<TcpStream>),
    TokioWebsockets(tokio_websockets::WebSocketStream<TcpStream>),
    FastWebsockets(fastwebsockets::WebSocket<TcpStream>),
    Own(wsframe::Link<TcpStream>),
}

impl Ws {
    async fn new(layer: Layer, tcp: TcpStream, client: bool) -> Self {
        match layer {
            Layer::Tungstenite => {
                let role = if client { TRole::Client } else { TRole::Server };
                Ws::Tungstenite(
                    tokio_tungstenite::WebSocketStream::from_raw_socket(
                        tcp,
                        role,
                        Some(netbore_mux::ws_config(MAX_MESSAGE)),
                    )
                    .await,
                )
            }
            Layer::TokioWebsockets => {
                let limits = tokio_websockets::Limits::default().max_payload_len(Some(MAX_MESSAGE));
                Ws::TokioWebsockets(if client {
                    tokio_websockets::ClientBuilder::new()
                        .limits(limits)
                        .take_over(tcp)
                } else {
                    tokio_websockets::ServerBuilder::new()
                        .limits(limits)
                        .serve(tcp)
                })
            }
            Layer::FastWebsockets => {
                let role = if client {
                    fastwebsockets::Role::Client
                } else {
                    fastwebsockets::Role::Server
                };
                let mut ws = fastwebsockets::WebSocket::after_handshake(tcp, role);
                ws.set_max_message_size(MAX_MESSAGE);
                Ws::FastWebsockets(ws)
            }
            Layer::Own => Ws::Own(wsframe::Link::new(tcp, client, MAX_MESSAGE)),
        }
    }

    /// Sends one binary message and flushes it, as the mux's writer does per batch.
    async fn send(&mut self, payload: BytesMut) -> anyhow::Result<()> {
        match self {
            Ws::Tungstenite(ws) => ws.send(TMessage::Binary(payload.freeze())).await?,
            Ws::TokioWebsockets(ws) => {
                ws.send(tokio_websockets::Message::binary(payload.freeze()))
                    .await?
            }
            Ws::FastWebsockets(ws) => {
                ws.write_frame(fastwebsockets::Frame::binary(
                    fastwebsockets::Payload::Bytes(payload),
                ))
                .await?
            }
            Ws::Own(l) => l.send(payload).await?,
        }
        Ok(())
    }

    /// The next binary message, or `None` at the end of the stream.
    async fn recv(&mut self) -> anyhow::Result<Option<Bytes>> {
        Ok(match self {
            Ws::Tungstenite(ws) => match ws.next().await {
                None | Some(Ok(TMessage::Close(_))) => None,
                Some(Ok(TMessage::Binary(b))) => Some(b),
                Some(Ok(m)) => bail!("unexpected message {m:?}"),
                Some(Err(e)) => return Err(e.into()),
            },
            Ws::TokioWebsockets(ws) => match ws.next().await {
                None => None,
                Some(Ok(m)) if m.is_binary() => Some(m.into_payload().into()),
                Some(Ok(m)) if m.is_close() => None,
                Some(Ok(m)) => bail!("unexpected message {m:?}"),
                Some(Err(e)) => return Err(e.into()),
            },
            Ws::FastWebsockets(ws) => {
                let f = match ws.read_frame().await {
                    Ok(f) => f,
                    Err(fastwebsockets::WebSocketError::UnexpectedEOF) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                match (f.opcode, f.payload) {
                    (fastwebsockets::OpCode::Binary, fastwebsockets::Payload::Bytes(b)) => {
                        Some(b.freeze())
                    }
                    (fastwebsockets::OpCode::Close, _) => None,
                    (op, _) => bail!("unexpected frame {op:?}"),
                }
            }
            Ws::Own(l) => l.recv().await?,
        })
    }
}

/// A connected loopback pair (client, server), no delay on either, as the link sets it.
async fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (c, (s, _)) = (c?, s?);
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// Process CPU time (user + system, all threads).
fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Messages (ping-pong: both directions) or bytes (bulk) moved.
    units: f64,
    wall: Duration,
    cpu: Duration,
}

/// Appends `len` bytes of `fill` to `buf` and splits them off, as `transmit_into` +
/// `split` does in the mux: the message shares its allocation with `buf`.
fn message(buf: &mut BytesMut, fill: &[u8], len: usize) -> BytesMut {
    if buf.capacity() - buf.len() < len {
        buf.reserve((16 * 1024).max(len));
    }
    buf.extend_from_slice(&fill[..len]);
    buf.split()
}

/// One run on a runtime of its own with one thread: both ends share it, so the CPU
/// counted is the layers' work, not the runtime's cross-thread wake-ups, and no other
/// run's tasks are in it.
async fn run(layer: Layer, work: Work) -> anyhow::Result<Sample> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                tokio::time::timeout(RUN_TIMEOUT, run_on(layer, work))
                    .await
                    .context("timed out")?
            })
    })
    .await?
}

async fn run_on(layer: Layer, work: Work) -> anyhow::Result<Sample> {
    let (c, s) = tcp_pair().await?;
    let fill: Vec<u8> = (0..BULK).map(|i| (i * 7 + 3) as u8).collect();
    let fill2 = fill.clone();
    let mut client = Ws::new(layer, c, true).await;
    let mut server = Ws::new(layer, s, false).await;
    let start = Instant::now();
    let cpu0 = cpu_now();
    let units = match work {
        Work::PingPong => {
            let srv = tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(16 * 1024);
                for _ in 0..ROUND_TRIPS {
                    let m = server.recv().await?.context("client hung up")?;
                    server.send(message(&mut buf, &fill2, m.len())).await?;
                }
                anyhow::Ok(server)
            });
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let (mut sent, mut got) = (0, 0);
            while sent < IN_FLIGHT {
                client.send(message(&mut buf, &fill, SMALL)).await?;
                sent += 1;
            }
            while got < ROUND_TRIPS {
                let m = client.recv().await?.context("server hung up")?;
                if m.len() != SMALL {
                    bail!("answer of {} bytes", m.len());
                }
                got += 1;
                if sent < ROUND_TRIPS {
                    client.send(message(&mut buf, &fill, SMALL)).await?;
                    sent += 1;
                }
            }
            drop(srv.await??);
            (2 * ROUND_TRIPS) as f64
        }
        Work::BulkUp | Work::BulkDown => {
            let (mut tx, mut rx) = if work == Work::BulkUp {
                (client, server)
            } else {
                (server, client)
            };
            let sender = tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(16 * 1024);
                for _ in 0..BULK_MESSAGES {
                    tx.send(message(&mut buf, &fill2, BULK)).await?;
                }
                anyhow::Ok(tx)
            });
            let mut bytes = 0;
            while bytes < BULK * BULK_MESSAGES {
                let m = rx.recv().await?.context("sender hung up")?;
                bytes += m.len();
            }
            drop(sender.await??);
            bytes as f64
        }
    };
    Ok(Sample {
        units,
        wall: start.elapsed(),
        cpu: cpu_now() - cpu0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs every layer on every workload for `rounds` rounds and prints the medians.
pub async fn ws_layers(rounds: usize) -> anyhow::Result<()> {
    // samples[work][layer] = one sample per round
    let mut samples = vec![vec![Vec::<Sample>::new(); LAYERS.len()]; WORKS.len()];
    // Warm-up: one short pass of every layer (allocator, page cache, CPU frequency).
    for layer in LAYERS {
        run(layer, Work::PingPong).await.context("warm-up")?;
    }
    for round in 0..rounds {
        for (wi, work) in WORKS.iter().enumerate() {
            for k in 0..LAYERS.len() {
                let li = (k + round) % LAYERS.len();
                let s = run(LAYERS[li], *work)
                    .await
                    .with_context(|| format!("{} {}", LAYERS[li].name(), work.name()))?;
                samples[wi][li].push(s);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!(
        "WebSocket layers, both ends on one runtime thread over loopback TCP, {rounds} rounds, medians"
    );
    for (wi, work) in WORKS.iter().enumerate() {
        let bulk = *work != Work::PingPong;
        let (rate_unit, cpu_unit) = if bulk {
            ("MB/s", "CPU ms/MB")
        } else {
            ("msg/s", "CPU µs/msg")
        };
        println!();
        println!(
            "| {} | {rate_unit} | {cpu_unit} | rate vs tungstenite | CPU vs tungstenite (range) |",
            work.name()
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        let per = |s: &Sample| {
            let units = if bulk { s.units / 1e6 } else { s.units };
            let rate = units / s.wall.as_secs_f64();
            let cpu = if bulk {
                s.cpu.as_secs_f64() * 1e3 / units
            } else {
                s.cpu.as_secs_f64() * 1e6 / units
            };
            (rate, cpu)
        };
        for (li, layer) in LAYERS.iter().enumerate() {
            let rate = median(samples[wi][li].iter().map(|s| per(s).0).collect());
            let cpu = median(samples[wi][li].iter().map(|s| per(s).1).collect());
            let rate_ratio = median(
                (0..rounds)
                    .map(|r| per(&samples[wi][li][r]).0 / per(&samples[wi][0][r]).0)
                    .collect(),
            );
            let cpu_ratios: Vec<f64> = (0..rounds)
                .map(|r| per(&samples[wi][li][r]).1 / per(&samples[wi][0][r]).1)
                .collect();
            let lo = cpu_ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = cpu_ratios.iter().copied().fold(0.0, f64::max);
            let cpu_ratio = median(cpu_ratios);
            let prec = if bulk { 3 } else { 2 };
            println!(
                "| {} | {rate:.0} | {cpu:.prec$} | {rate_ratio:.2} | {cpu_ratio:.2} ({lo:.2}–{hi:.2}) |",
                layer.name()
            );
        }
    }
    Ok(())
}
