//! Fault-injecting byte proxy for tests: sits between the agent and a host and flips bits, drops bytes,
//! duplicates bytes, and replays whole chunks, in both directions, from a seeded generator.
//!
//! Design: one task pair per accepted connection; every chunk read is mutated byte by byte with probabilities in
//! parts per million, then (rarely) written twice to replay recent frames. The generator is a xorshift64*, so a
//! failing seed can be replayed exactly.
//!
//! Invariant: the proxy never invents frames; anything it produces is a corruption, loss, duplication or replay
//! of real traffic — exactly the faults the channel must survive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::link::{self, Address, Listener};

/// Fault probabilities in parts per million.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Per byte: flip one random bit.
    pub flip_ppm: u32,
    /// Per byte: drop it.
    pub drop_ppm: u32,
    /// Per byte: send it twice.
    pub dup_ppm: u32,
    /// Per chunk: send the chunk twice.
    pub replay_ppm: u32,
    /// Cut what the target (the host) sends into chunks of at most this many bytes before the faults (0 = as read).
    /// A chunk is otherwise what one read returned, which follows the sender's writes and the scheduling: QEMU's
    /// 16550 writes each byte on its own, so the proxy reads 1 to 16 bytes at a time and the replay rate per byte
    /// varies from run to run. `1` makes it the worst case, the same in every run: every byte replayed with
    /// `replay_ppm`.
    pub target_chunk: usize,
    /// Generator seed.
    pub seed: u64,
}

/// What the proxy did.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStats {
    /// Bytes forwarded (before faults).
    pub bytes: AtomicU64,
    /// Bits flipped.
    pub flipped: AtomicU64,
    /// Bytes dropped.
    pub dropped: AtomicU64,
    /// Bytes duplicated.
    pub duplicated: AtomicU64,
    /// Chunks replayed.
    pub replayed: AtomicU64,
    /// Chunks read from the agent (towards the host).
    pub chunks_to_host: AtomicU64,
    /// Chunks read from the host (towards the agent). A chunk is what one read returned, so its size follows the
    /// sender's write pattern (a 16550 in QEMU writes one byte per write), and a replay costs one chunk.
    pub chunks_to_agent: AtomicU64,
    /// Bytes read from the host (towards the agent).
    pub bytes_to_agent: AtomicU64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn hit(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.next() % 1_000_000 < u64::from(ppm)
    }
}

fn mutate(rng: &mut Rng, f: &Faults, stats: &ProxyStats, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    for &b in data {
        if rng.hit(f.drop_ppm) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut b = b;
        if rng.hit(f.flip_ppm) {
            b ^= 1 << (rng.next() % 8);
            stats.flipped.fetch_add(1, Ordering::Relaxed);
        }
        out.push(b);
        if rng.hit(f.dup_ppm) {
            out.push(b);
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
    }
    if rng.hit(f.replay_ppm) {
        let again = out.clone();
        out.extend(again);
        stats.replayed.fetch_add(1, Ordering::Relaxed);
    }
    out
}

async fn pump(
    mut from: tokio::io::ReadHalf<link::BoxStream>,
    mut to: tokio::io::WriteHalf<link::BoxStream>,
    f: Faults,
    seed: u64,
    stats: Arc<ProxyStats>,
    to_agent: bool,
) {
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let bytes = u64::try_from(n).unwrap_or(0);
        stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        if to_agent {
            let chunks = if f.target_chunk > 0 {
                n.div_ceil(f.target_chunk)
            } else {
                1
            };
            stats
                .chunks_to_agent
                .fetch_add(u64::try_from(chunks).unwrap_or(0), Ordering::Relaxed);
            stats.bytes_to_agent.fetch_add(bytes, Ordering::Relaxed);
        } else {
            stats.chunks_to_host.fetch_add(1, Ordering::Relaxed);
        }
        let chunk = if to_agent && f.target_chunk > 0 {
            f.target_chunk
        } else {
            n
        };
        let mut out = Vec::with_capacity(n + 8);
        for piece in buf[..n].chunks(chunk) {
            out.extend(mutate(&mut rng, &f, &stats, piece));
        }
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Starts the proxy on `listen`, forwarding to `target`; returns the bound address and the counters.
///
/// # Errors
/// Bind errors.
pub async fn spawn(
    listen: &Address,
    target: Address,
    f: Faults,
) -> std::io::Result<(Address, Arc<ProxyStats>)> {
    let l = Listener::bind(listen).await?;
    let addr = l.local()?;
    let stats = Arc::new(ProxyStats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        let mut conn = 0u64;
        loop {
            let Ok(a) = l.accept().await else { continue };
            let Ok(b) = link::connect(&target).await else {
                continue;
            };
            conn += 1;
            let (ar, aw) = tokio::io::split(a);
            let (br, bw) = tokio::io::split(b);
            tokio::spawn(pump(
                ar,
                bw,
                f,
                f.seed ^ conn.wrapping_mul(0x9e37_79b9),
                st.clone(),
                false,
            ));
            tokio::spawn(pump(
                br,
                aw,
                f,
                f.seed ^ conn.wrapping_mul(0x85eb_ca6b) ^ 1,
                st.clone(),
                true,
            ));
        }
    });
    Ok((addr, stats))
}
