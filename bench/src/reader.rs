//! A subscriber that checks what it gets, for the overload, scale and soak scenarios.
//!
//! It counts data frames of one run (which must come with sequence numbers 0, 1, 2, ... in
//! order, each once), notes the first sync frame it sees (proof that it is joined), stops at
//! the run's end marker, and records how the server closed it (the close code, or 1006 for a
//! connection that ended without a close frame). Progress is summed across all readers of a
//! run in a shared [`Tally`], which the scenario watches instead of sleeping.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{watch, Notify};

use crate::client::{close_code, encode_frame, Conn, OP_BINARY, OP_CLOSE, OP_PING};
use crate::scenario::{u64_at, DATA, HEADER, OP_PONG, SYNC};

/// The end marker a publisher sends after its last data frame: a reader that sees it has
/// seen every frame it will get (delivery is in order), so no sleep is needed to be sure
/// that no duplicate follows.
pub const END: [u8; 8] = *b"MLESEND!";

/// Close code for "ended without a close frame" (RFC 6455 1006).
pub const ABNORMAL: u16 = 1006;
/// Close code mles (and the relays) send to a member too slow for its channel.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// Progress of all readers of a run.
#[derive(Default)]
pub struct Tally {
    pub connected: AtomicUsize,
    pub synced: AtomicUsize,
    /// Data frames received, all readers together.
    pub received: AtomicU64,
    /// Readers that got every frame they wanted.
    pub complete: AtomicUsize,
    /// Readers that saw the end marker.
    pub ended: AtomicUsize,
    /// Readers closed with 1013.
    pub cut: AtomicUsize,
    /// Readers closed any other way (close code or dropped connection).
    pub closed: AtomicUsize,
    /// Data frames out of sequence, all readers together.
    pub errors: AtomicU64,
    /// Wakes whoever waits for progress.
    pub changed: Notify,
}

impl Tally {
    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Readers that are finished one way or another.
    pub fn gone(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
            + self.cut.load(Ordering::SeqCst)
            + self.closed.load(Ordering::SeqCst)
    }

    /// Waits until `done()` holds, or no counter moved for `stall`, or `deadline` passes;
    /// true if `done()` held.
    pub async fn wait_until(
        &self,
        done: impl Fn(&Tally) -> bool,
        stall: std::time::Duration,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut last = self.fingerprint();
        let mut moved = tokio::time::Instant::now();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            let fp = self.fingerprint();
            if fp != last {
                last = fp;
                moved = now;
            }
            if now >= deadline || now.duration_since(moved) >= stall {
                return false;
            }
            // Woken by progress, or at the latest in 100 ms to check the bounds.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
        }
    }

    fn fingerprint(&self) -> [u64; 7] {
        [
            self.connected.load(Ordering::SeqCst) as u64,
            self.synced.load(Ordering::SeqCst) as u64,
            self.received.load(Ordering::SeqCst),
            self.complete.load(Ordering::SeqCst) as u64,
            self.ended.load(Ordering::SeqCst) as u64,
            self.cut.load(Ordering::SeqCst) as u64,
            self.closed.load(Ordering::SeqCst) as u64,
        ]
    }
}

/// What one reader saw.
#[derive(Debug, Default, Clone)]
pub struct ReadResult {
    pub received: u64,
    /// Frames that were not the sequence number expected next (lost, duplicated, reordered).
    pub errors: u64,
    pub first_error: Option<String>,
    pub synced: bool,
    pub ended: bool,
    /// How the server closed it, if it did.
    pub close: Option<u16>,
}

/// A reader that stops reading once synced until `resume` turns true (the stalled reader
/// of the burst scenario).
pub struct Stall {
    pub resume: watch::Receiver<bool>,
}

/// Reads `conn` until the end marker of `run`, a close, or `stop` turning true; `want` data
/// frames make it complete.
pub async fn read(
    mut conn: Conn,
    run: u64,
    want: u64,
    tally: &Tally,
    mut stall: Option<Stall>,
    mut stop: watch::Receiver<bool>,
) -> ReadResult {
    let mut res = ReadResult::default();
    let mut pongs = Vec::new();
    'read: loop {
        if let Some(s) = stall.as_mut().filter(|_| res.synced) {
            tokio::select! {
                _ = s.resume.wait_for(|r| *r) => {}
                _ = stop.wait_for(|s| *s) => break 'read,
            }
            stall = None;
        }
        let filled = tokio::select! {
            filled = conn.fill() => filled,
            _ = stop.wait_for(|s| *s) => break 'read,
        };
        match filled {
            Ok(0) | Err(_) => {
                res.close = Some(ABNORMAL);
                break;
            }
            Ok(_) => {}
        }
        loop {
            let (op, range) = match conn.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    res.close = Some(ABNORMAL);
                    break 'read;
                }
            };
            match op {
                OP_BINARY => {
                    let p = conn.payload(range);
                    if p.len() < HEADER || u64_at(p, 8) != run {
                        continue;
                    }
                    if p[..8] == DATA {
                        let seq = u64_at(p, 20);
                        if seq != res.received {
                            res.errors += 1;
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                            if res.first_error.is_none() {
                                res.first_error =
                                    Some(format!("expected frame {}, got {seq}", res.received));
                            }
                        }
                        res.received += 1;
                        tally.received.fetch_add(1, Ordering::Relaxed);
                        if res.received == want {
                            tally.bump(&tally.complete);
                        } else if res.received % 64 == 0 {
                            tally.changed.notify_waiters();
                        }
                    } else if p[..8] == SYNC && !res.synced {
                        res.synced = true;
                        tally.bump(&tally.synced);
                    } else if p[..8] == END {
                        res.ended = true;
                        break 'read;
                    }
                }
                OP_PING => {
                    let payload = conn.payload(range).to_vec();
                    encode_frame(&mut pongs, OP_PONG, &payload, conn.mask);
                }
                OP_CLOSE => {
                    res.close = Some(close_code(conn.payload(range)));
                    break 'read;
                }
                // Text: join frames replayed as history, presence notices.
                _ => {}
            }
        }
        if !pongs.is_empty() {
            if conn.send(&pongs).await.is_err() {
                res.close = Some(ABNORMAL);
                break;
            }
            pongs.clear();
        }
    }
    match res.close {
        _ if res.ended => tally.bump(&tally.ended),
        Some(TRY_AGAIN_LATER) => tally.bump(&tally.cut),
        Some(_) => tally.bump(&tally.closed),
        None => {}
    }
    res
}

/// A publishing client: writes sync, data and end frames of one run; what the server sends
/// it is read and dropped by a task of its own.
pub struct Publisher {
    wr: tokio::io::WriteHalf<crate::client::BoxIo>,
    drain: tokio::task::JoinHandle<()>,
    mask: [u8; 4],
    run: u64,
    channel: u32,
    payload: Vec<u8>,
    out: Vec<u8>,
}

impl Publisher {
    /// Connects and joins `channel`; data frames carry `size` bytes.
    pub async fn connect(
        target: &crate::client::Target,
        opts: crate::client::SocketOpts,
        uid: &str,
        channel: &str,
        channel_index: u32,
        run: u64,
        size: usize,
    ) -> std::io::Result<Publisher> {
        let conn = Conn::connect_with(target, opts, uid, channel, 1024).await?;
        let mask = conn.mask;
        let (mut rd, wr) = tokio::io::split(conn.into_io());
        let drain = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        Ok(Publisher {
            wr,
            drain,
            mask,
            run,
            channel: channel_index,
            payload: vec![0u8; size.max(HEADER)],
            out: Vec::new(),
        })
    }

    /// True once the server closed the connection.
    pub fn closed(&self) -> bool {
        self.drain.is_finished()
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.wr.write_all(&self.out).await?;
        self.wr.flush().await
    }

    fn frame(&mut self, magic: &[u8; 8], seq: u64, len: usize) {
        crate::scenario::write_header(
            &mut self.payload,
            magic,
            self.run,
            self.channel,
            seq,
            crate::scenario::now_ns(),
        );
        encode_frame(&mut self.out, OP_BINARY, &self.payload[..len], self.mask);
    }

    /// One sync frame.
    pub async fn sync(&mut self, n: u64) -> std::io::Result<()> {
        self.out.clear();
        self.frame(&SYNC, n, HEADER);
        self.write_out().await
    }

    /// Data frames `from..to`, flat out, [`crate::scenario::BATCH`] to a write.
    pub async fn data(&mut self, from: u64, to: u64) -> std::io::Result<()> {
        let mut seq = from;
        while seq < to {
            self.out.clear();
            let len = self.payload.len();
            for _ in 0..crate::scenario::BATCH.min(to - seq) {
                self.frame(&DATA, seq, len);
                seq += 1;
            }
            self.write_out().await?;
        }
        Ok(())
    }

    /// The end marker.
    pub async fn end(&mut self) -> std::io::Result<()> {
        self.out.clear();
        self.frame(&END, 0, HEADER);
        self.write_out().await
    }

    /// Sends a sync frame every `every` until `synced()` holds or the connection fails;
    /// bounded by `deadline`. Returns whether it held.
    pub async fn sync_until(
        &mut self,
        tally: &Tally,
        synced: impl Fn(&Tally) -> bool,
        every: std::time::Duration,
        deadline: tokio::time::Instant,
    ) -> std::io::Result<bool> {
        let mut n = 0;
        loop {
            if synced(tally) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline || self.closed() {
                return Ok(false);
            }
            self.sync(n).await?;
            n += 1;
            // The next sync goes out after `every`, unless all are synced before.
            let next = tokio::time::Instant::now() + every;
            while tokio::time::Instant::now() < next {
                let notified = tally.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if synced(tally) {
                    return Ok(true);
                }
                let _ = tokio::time::timeout_at(next, notified).await;
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.drain.abort();
    }
}
