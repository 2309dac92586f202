//! Channel history on disk, so a restart — graceful or `kill -9` — brings it back.
//!
//! One append-only log per channel under `<cache>/history/`, named by the channel name in
//! hex. Each record is `len:u32le crc32:u32le body`, body = `live:u8 kind:u8 origin_len:u8
//! origin seq:u64le payload`; the CRC covers the body. The hub hands every stored frame to
//! [`Store::record`], which only queues it (never blocks); a writer task appends, flushes
//! every [`FLUSH_EVERY`] and fsyncs every [`SYNC_EVERY`]. A log that grows past twice the
//! history limit is rewritten from the channel's current history (write to a temporary
//! file, fsync, rename). Loading stops at the first record that is truncated or fails its
//! checksum, logs it, and keeps what came before; a file that cannot be read is skipped.
//!
//! An append-only log with checksums was chosen over an embedded database because history
//! is a bounded ring per channel: appends and a periodic rewrite are all it needs, and the
//! format stays readable with a dozen lines of code.
//!
//! Loss bound: a frame the server received is on disk (in the kernel's page cache, which
//! survives the process being killed) within [`FLUSH_EVERY`], and on stable storage within
//! [`SYNC_EVERY`]; if the disk falls so far behind that the queue of [`QUEUE`] records
//! fills, further frames are not persisted and are counted in `history_persist_dropped`.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::frame::{Frame, FrameKind};
use bytes::Bytes;
use log::{info, warn};
use tokio::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use crate::hub::{Channel, Entry, Hub, MsgKey, Recorder};
use crate::metrics::Metrics;

pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
pub const QUEUE: usize = 65_536;

/// Largest record accepted when loading; anything larger is corruption.
const MAX_RECORD: usize = 256 * 1024 * 1024;

enum Op {
    Append(Arc<Channel>, Entry),
    Forget(Arc<str>),
    Sync(oneshot::Sender<()>),
}

/// The persistence side of the hub.
pub struct Store {
    tx: mpsc::Sender<Op>,
    dropped: Counter,
}

impl Recorder for Store {
    fn record(&self, channel: &Arc<Channel>, entry: &Entry) {
        if self
            .tx
            .try_send(Op::Append(channel.clone(), entry.clone()))
            .is_err()
        {
            self.dropped.inc();
        }
    }

    fn forget(&self, channel: Arc<str>) {
        let _ = self.tx.try_send(Op::Forget(channel));
    }
}

impl Store {
    /// Loads every channel's history from `cache` into `hub`, then starts the writer
    /// thread. Connect the result with [`Hub::set_recorder`].
    pub fn open(cache: &Path, hub: &Hub, metrics: &Metrics) -> io::Result<Arc<Store>> {
        let dir = cache.join("history");
        fs::create_dir_all(&dir)?;
        let mut writer = Writer {
            dir: dir.clone(),
            limit: hub.config().history_limit,
            max_bytes: hub.config().channel_bytes,
            logs: HashMap::new(),
            tails: HashMap::new(),
            buf: Vec::new(),
        };
        let mut loaded = 0;
        for file in fs::read_dir(&dir)? {
            let path = file?.path();
            let Some(name) = channel_name(&path) else {
                continue;
            };
            match load(&path) {
                Ok((entries, corrupt)) => {
                    if let Some(offset) = corrupt {
                        warn!(
                            "history of '{name}': {} damaged at byte {offset}; kept the {} records before it",
                            path.display(),
                            entries.len()
                        );
                        metrics.history_corrupt_files.inc();
                    }
                    loaded += entries.len();
                    let channel = match hub.channel_or_create(&name) {
                        Ok(channel) => channel,
                        Err(e) => {
                            warn!("history of '{name}' not loaded: {e}");
                            continue;
                        }
                    };
                    channel.restore(entries);
                    let history = channel.history();
                    // Rewrite now, so a damaged tail is gone and the log starts compact.
                    if let Err(e) = rewrite(&path, &history) {
                        warn!("rewriting history of '{name}': {e}");
                    }
                    let bytes = history.iter().map(|e| e.frame.len()).sum();
                    let tail = Tail {
                        entries: history.into(),
                        bytes,
                    };
                    writer.tails.insert(Arc::from(name.as_str()), tail);
                }
                Err(e) => {
                    warn!("skipping unreadable history {}: {e}", path.display());
                    metrics.history_corrupt_files.inc();
                }
            }
        }
        if loaded > 0 {
            info!("loaded {loaded} history frames from {}", dir.display());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        // A thread of its own: file I/O blocks, and it must not hold up runtime shutdown.
        std::thread::Builder::new()
            .name("mles-store".into())
            .spawn(move || write_loop(writer, rx))?;
        Ok(Arc::new(Store {
            tx,
            dropped: metrics.history_persist_dropped.clone(),
        }))
    }

    /// Waits until everything recorded so far is written and synced.
    pub async fn sync(&self) {
        let (done, synced) = oneshot::channel();
        if self.tx.send(Op::Sync(done)).await.is_ok() {
            let _ = synced.await;
        }
    }
}

fn file_for(dir: &Path, channel: &str) -> PathBuf {
    dir.join(format!("{}.log", hex::encode(channel)))
}

fn channel_name(path: &Path) -> Option<String> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".log")?;
    String::from_utf8(hex::decode(stem).ok()?).ok()
}

fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let kind = match entry.frame.kind() {
        FrameKind::Text => 0,
        FrameKind::Binary => 1,
    };
    let payload: &[u8] = entry.frame.data();
    let origin = &entry.key.origin.as_bytes()[..entry.key.origin.len().min(255)];
    let mut body = Vec::with_capacity(3 + origin.len() + 8 + payload.len());
    body.push(entry.live as u8);
    body.push(kind);
    body.push(origin.len() as u8);
    body.extend_from_slice(origin);
    body.extend_from_slice(&entry.key.seq.to_le_bytes());
    body.extend_from_slice(payload);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

fn decode(body: &[u8]) -> Option<(MsgKey, bool, Frame)> {
    let (&live, rest) = body.split_first()?;
    let (&kind, rest) = rest.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = len as usize;
    if rest.len() < len + 8 {
        return None;
    }
    let origin = std::str::from_utf8(&rest[..len]).ok()?;
    let seq = u64::from_le_bytes(rest[len..len + 8].try_into().ok()?);
    let payload = Bytes::copy_from_slice(&rest[len + 8..]);
    let kind = match kind {
        0 => FrameKind::Text,
        1 => FrameKind::Binary,
        _ => return None,
    };
    let msg = Frame::new(kind, payload)?;
    let key = MsgKey {
        origin: Arc::from(origin),
        seq,
    };
    Some((key, live != 0, msg))
}

type Loaded = (Vec<(MsgKey, bool, Frame)>, Option<usize>);

/// Reads a log: its records, and the offset of the first damaged record, if any.
fn load(path: &Path) -> io::Result<Loaded> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut entries = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let record = (|| {
            let header = data.get(at..at + 8)?;
            let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
            if len > MAX_RECORD {
                return None;
            }
            let body = data.get(at + 8..at + 8 + len)?;
            if crc32fast::hash(body) != crc {
                return None;
            }
            Some((decode(body)?, 8 + len))
        })();
        match record {
            Some((entry, size)) => {
                entries.push(entry);
                at += size;
            }
            None => return Ok((entries, Some(at))),
        }
    }
    Ok((entries, None))
}

/// Replaces a log with exactly `entries`, atomically.
fn rewrite(path: &Path, entries: &[Entry]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = Vec::new();
    for entry in entries {
        encode(entry, &mut out);
    }
    let mut file = File::create(&tmp)?;
    file.write_all(&out)?;
    file.sync_data()?;
    fs::rename(&tmp, path)
}

struct OpenLog {
    writer: BufWriter<File>,
    records: usize,
    dirty: bool,
    last_write: Instant,
}

/// What the writer knows of one channel: the history as of the last record it wrote, in
/// the order the hub stored it, which is what a compaction rewrites.
#[derive(Default)]
struct Tail {
    entries: VecDeque<Entry>,
    bytes: usize,
}

struct Writer {
    dir: PathBuf,
    limit: usize,
    max_bytes: usize,
    logs: HashMap<Arc<str>, OpenLog>,
    tails: HashMap<Arc<str>, Tail>,
    buf: Vec<u8>,
}

/// The writer thread: appends queued records, flushes, syncs and compacts.
fn write_loop(mut w: Writer, mut rx: mpsc::Receiver<Op>) {
    let mut last_sync = Instant::now();
    loop {
        // Block for the first op, then take whatever else is queued.
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let deadline = Instant::now() + FLUSH_EVERY;
        let mut op = Some(first);
        while let Some(current) = op.take() {
            w.apply(current);
            if Instant::now() >= deadline {
                break;
            }
            op = rx.try_recv().ok();
        }
        let sync = last_sync.elapsed() >= SYNC_EVERY;
        flush_all(&mut w.logs, sync);
        if sync {
            last_sync = Instant::now();
            // Close logs idle for a minute so open files stay bounded by busy channels.
            w.logs
                .retain(|_, log| log.last_write.elapsed() < Duration::from_secs(60));
        }
    }
    flush_all(&mut w.logs, true);
}

impl Writer {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Sync(done) => {
                flush_all(&mut self.logs, true);
                let _ = done.send(());
            }
            Op::Forget(name) => {
                self.logs.remove(&name);
                self.tails.remove(&name);
                let _ = fs::remove_file(file_for(&self.dir, &name));
            }
            Op::Append(channel, entry) => self.append(&channel, entry),
        }
    }

    fn append(&mut self, channel: &Channel, entry: Entry) {
        let name: Arc<str> = Arc::from(channel.name());
        let path = file_for(&self.dir, &name);
        let tail = self.tails.entry(name.clone()).or_default();
        tail.bytes += entry.frame.len();
        tail.entries.push_back(entry.clone());
        while tail.entries.len() > self.limit || tail.bytes > self.max_bytes {
            let Some(old) = tail.entries.pop_front() else {
                break;
            };
            tail.bytes -= old.frame.len();
        }
        if !self.logs.contains_key(&name) {
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => {
                    let log = OpenLog {
                        writer: BufWriter::new(file),
                        records: 0,
                        dirty: false,
                        last_write: Instant::now(),
                    };
                    self.logs.insert(name.clone(), log);
                }
                Err(e) => {
                    warn!("cannot open {}: {e}", path.display());
                    return;
                }
            }
        }
        let log = self.logs.get_mut(&name).expect("just inserted");
        self.buf.clear();
        encode(&entry, &mut self.buf);
        if let Err(e) = log.writer.write_all(&self.buf) {
            warn!("writing {}: {e}", path.display());
        }
        log.records += 1;
        log.dirty = true;
        log.last_write = Instant::now();
        if log.records > 2 * self.limit + 16 {
            let _ = log.writer.flush();
            let tail: Vec<Entry> = self.tails[&name].entries.iter().cloned().collect();
            match rewrite(&path, &tail) {
                Ok(()) => {
                    self.logs.remove(&name);
                }
                Err(e) => warn!("compacting {}: {e}", path.display()),
            }
        }
    }
}

fn flush_all(logs: &mut HashMap<Arc<str>, OpenLog>, sync: bool) {
    for log in logs.values_mut().filter(|l| l.dirty) {
        if log.writer.flush().is_ok() && sync {
            let _ = log.writer.get_ref().sync_data();
            log.dirty = false;
        }
    }
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, live: bool, frame: Frame) -> Entry {
        Entry {
            seq,
            from: 1,
            live,
            key: MsgKey {
                origin: Arc::from("srv#1"),
                seq,
            },
            frame,
        }
    }

    #[test]
    fn records_round_trip_and_a_damaged_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut data = Vec::new();
        encode(&entry(1, false, Frame::text("{\"uid\":\"a\"}")), &mut data);
        encode(&entry(2, true, Frame::binary(vec![0u8, 1, 2])), &mut data);
        let good = data.len();
        encode(&entry(3, true, Frame::text("lost")), &mut data);
        data[good + 10] ^= 0xff; // flip a bit in the third record
        fs::write(&path, &data).unwrap();
        let (entries, corrupt) = load(&path).unwrap();
        assert_eq!(corrupt, Some(good));
        assert_eq!(entries.len(), 2);
        assert!(!entries[0].1 && entries[1].1);
        assert_eq!(entries[1].2, Frame::binary(vec![0u8, 1, 2]));
        // Truncation mid-record is detected the same way.
        fs::write(&path, &data[..good + 5]).unwrap();
        assert_eq!(load(&path).unwrap().1, Some(good));
    }

    #[test]
    fn channel_names_survive_the_file_name() {
        let p = file_for(Path::new("/x"), "a/b c..");
        assert_eq!(channel_name(&p).as_deref(), Some("a/b c.."));
    }
}
