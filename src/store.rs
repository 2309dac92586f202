//! Channel history on disk, so a restart — graceful or `kill -9` — brings it back.
//!
//! One append-only log per channel under `<cache>/history/`, named by a hash of the channel
//! name (any valid name fits a file name, however long) and beginning with a record that
//! holds the full name. Each record is `len:u32le crc32:u32le body`; the CRC
//! covers the body. The first record's body is `"MLESNAME" epoch:u64le name`; every other body is
//! `live:u8 kind:u8 origin_len:u8 origin seq:u64le position:u64le payload`. The epoch and
//! the positions are the channel's numbering, so positions clients saw (resume tokens)
//! stay valid across a restart.
//!
//! The hub hands every stored frame to [`Store::record`], which only queues it (never
//! blocks); a writer thread appends, flushes every [`FLUSH_EVERY`] and fsyncs every
//! [`SYNC_EVERY`]. A log that grows past twice the history limit is rewritten with only
//! its last `--limit` records (write to a temporary file, fsync, rename); the count of a
//! log's records survives closing it (it is counted again when reopened), so the bound
//! holds across idle closes and restarts.
//!
//! Nothing is loaded at start: a channel's history is read when the channel is next used
//! ([`Store::load`], from [`Hub::prepare`](crate::hub::Hub::prepare)), streaming, keeping
//! only the last `--limit` frames (and `--channel-bytes`), so a huge or hostile log costs
//! time once, never memory. Loading stops at the first record that is truncated or fails
//! its checksum, logs it, counts it (`history_corrupt_files`), keeps what came before, and
//! rewrites the log without the damage.
//!
//! An append-only log with checksums was chosen over an embedded database because history
//! is a bounded ring per channel: appends and a periodic rewrite are all it needs, and the
//! format stays readable with a dozen lines of code.
//!
//! Loss bound: a frame the server received is on disk (in the kernel's page cache, which
//! survives the process being killed) within [`FLUSH_EVERY`], and on stable storage within
//! [`SYNC_EVERY`]; if the disk falls so far behind that the queue of [`QUEUE`] records
//! fills, further frames are not persisted and are counted in `history_persist_dropped`.
//! Frames waiting in the queue are charged to the memory budget like any held frame.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{info, warn};
use prometheus_client::metrics::counter::Counter;
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};

use crate::budget::{charge_frame, Budget};
use crate::config::HubConfig;
use crate::frame::{Frame, FrameKind};
use crate::hub::{Channel, Entry, MsgKey, Recorder, Restored, RestoredEntry};
use crate::metrics::Metrics;

pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
pub const QUEUE: usize = 65_536;

/// Largest record accepted when loading; anything larger is corruption.
const MAX_RECORD: usize = 256 * 1024 * 1024;

/// How a log's first record starts.
const NAME_MAGIC: &[u8; 8] = b"MLESNAME";

/// Logs idle this long are closed, so open files stay bounded by busy channels.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

enum Op {
    Append(Arc<str>, u64, Entry),
    Forget(Arc<str>),
    Sync(oneshot::Sender<()>),
}

/// The persistence side of the hub.
pub struct Store {
    dir: PathBuf,
    limit: usize,
    max_bytes: usize,
    tx: mpsc::Sender<Op>,
    dropped: Counter,
    corrupt: Counter,
    budget: Arc<Budget>,
}

impl Recorder for Store {
    fn record(&self, channel: &Arc<Channel>, entry: &Entry) {
        let name: Arc<str> = Arc::from(channel.name());
        let op = Op::Append(name, channel.epoch(), entry.clone());
        if self.tx.try_send(op).is_err() {
            self.dropped.inc();
        }
    }

    fn forget(&self, channel: Arc<str>) {
        let _ = self.tx.try_send(Op::Forget(channel));
    }

    fn load(&self, channel: &str) -> Restored {
        let path = log_path(&self.dir, channel);
        let log = match read_log(&path, self.limit, self.max_bytes) {
            Ok(log) => log,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Restored::default(),
            Err(e) => {
                warn!(
                    "history of '{channel}': cannot read {}: {e}",
                    path.display()
                );
                self.corrupt.inc();
                return Restored::default();
            }
        };
        if let Some(offset) = log.damaged_at {
            warn!(
                "history of '{channel}': {} damaged at byte {offset}; kept the records before it",
                path.display()
            );
            self.corrupt.inc();
        }
        let epoch = log.epoch.unwrap_or_else(fresh_epoch);
        if log.damaged_at.is_some() || log.records > 2 * self.limit {
            // Start compact and without the damage.
            if let Err(e) = rewrite(&path, channel, epoch, log.entries.iter()) {
                warn!("rewriting history of '{channel}': {e}");
            }
        }
        // Held from now on like any frame: charged to the budget, whatever the total.
        let entries = log
            .entries
            .into_iter()
            .map(|(key, live, frame, position)| RestoredEntry {
                position,
                key,
                live,
                frame: charge_frame(&self.budget, frame),
            })
            .collect();
        Restored {
            epoch: log.epoch,
            entries,
        }
    }
}

/// A random epoch for a log that has none.
fn fresh_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::getrandom(&mut bytes);
    u64::from_le_bytes(bytes)
}

impl Store {
    /// Opens the history directory under `cache` (moving logs of an earlier format to the
    /// current one), then starts the writer thread. Connect the result with
    /// [`crate::hub::Hub::set_recorder`].
    pub fn open(
        cache: &Path,
        config: &HubConfig,
        metrics: &Metrics,
        budget: Arc<Budget>,
    ) -> io::Result<Arc<Store>> {
        let dir = cache.join("history");
        fs::create_dir_all(&dir)?;
        let limit = config.history_limit;
        let max_bytes = config.channel_bytes;
        migrate(&dir, limit, max_bytes, &metrics.history_corrupt_files);
        let writer = Writer {
            dir: dir.clone(),
            limit,
            max_bytes,
            logs: HashMap::new(),
            failed: HashMap::new(),
            buf: Vec::new(),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        // A thread of its own: file I/O blocks, and it must not hold up runtime shutdown.
        std::thread::Builder::new()
            .name("mles-store".into())
            .spawn(move || write_loop(writer, rx))?;
        Ok(Arc::new(Store {
            dir,
            limit,
            max_bytes,
            tx,
            dropped: metrics.history_persist_dropped.clone(),
            corrupt: metrics.history_corrupt_files.clone(),
            budget,
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

/// The log file of `channel` under the history directory `dir`: a hash of the name, so
/// every valid channel name (up to 256 bytes) fits a file name.
pub fn log_path(dir: &Path, channel: &str) -> PathBuf {
    let hash = sha2::Sha256::digest(channel.as_bytes());
    dir.join(format!("{}.log", hex::encode(&hash[..16])))
}

/// Moves logs of the earlier format (named by the channel name in hex, no name record)
/// to the current one, compacting them on the way. Unreadable ones are counted and left.
fn migrate(dir: &Path, limit: usize, max_bytes: usize, corrupt: &Counter) {
    let Ok(files) = fs::read_dir(dir) else {
        return;
    };
    let mut moved = 0;
    for path in files.flatten().map(|f| f.path()) {
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        match first_record(&path) {
            Ok(Some(body)) if body.starts_with(NAME_MAGIC) => continue,
            Err(_) => continue,
            _ => {}
        }
        let Some(name) = hex::decode(stem)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        else {
            continue;
        };
        let log = read_records(&path, limit, max_bytes, false);
        match log {
            Ok(log) if log.damaged_at.is_none() || !log.entries.is_empty() => {
                if log.damaged_at.is_some() {
                    warn!(
                        "history of '{name}': {} damaged; kept the records before it",
                        path.display()
                    );
                    corrupt.inc();
                }
                let target = log_path(dir, &name);
                match rewrite(&target, &name, fresh_epoch(), log.entries.iter()) {
                    Ok(()) => {
                        let _ = fs::remove_file(&path);
                        moved += 1;
                    }
                    Err(e) => warn!("moving history of '{name}': {e}"),
                }
            }
            _ => {
                warn!("skipping unreadable history {}", path.display());
                corrupt.inc();
            }
        }
    }
    if moved > 0 {
        info!("moved {moved} history logs to the current format");
    }
}

fn encode_record(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
}

fn name_record(channel: &str, epoch: u64, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(NAME_MAGIC.len() + 8 + channel.len());
    body.extend_from_slice(NAME_MAGIC);
    body.extend_from_slice(&epoch.to_le_bytes());
    body.extend_from_slice(channel.as_bytes());
    encode_record(&body, out);
}

fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let kind = match entry.frame.kind() {
        FrameKind::Text => 0,
        FrameKind::Binary => 1,
    };
    let payload: &[u8] = entry.frame.data();
    encode_frame(&entry.key, entry.live, kind, payload, entry.seq, out);
}

fn encode_frame(
    key: &MsgKey,
    live: bool,
    kind: u8,
    payload: &[u8],
    position: u64,
    out: &mut Vec<u8>,
) {
    let origin = &key.origin.as_bytes()[..key.origin.len().min(255)];
    let mut body = Vec::with_capacity(3 + origin.len() + 16 + payload.len());
    body.push(live as u8);
    body.push(kind);
    body.push(origin.len() as u8);
    body.extend_from_slice(origin);
    body.extend_from_slice(&key.seq.to_le_bytes());
    body.extend_from_slice(&position.to_le_bytes());
    body.extend_from_slice(payload);
    encode_record(&body, out);
}

/// A stored frame: its key, liveness, the frame, and its position (none in logs of the
/// earlier format).
type Stored = (MsgKey, bool, Frame, Option<u64>);

/// A frame record's body; `positioned` for the current format.
fn decode(body: &[u8], positioned: bool) -> Option<Stored> {
    let (&live, rest) = body.split_first()?;
    let (&kind, rest) = rest.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = len as usize;
    let fixed = if positioned { 16 } else { 8 };
    if rest.len() < len + fixed {
        return None;
    }
    let origin = std::str::from_utf8(&rest[..len]).ok()?;
    let seq = u64::from_le_bytes(rest[len..len + 8].try_into().ok()?);
    let position = if positioned {
        Some(u64::from_le_bytes(rest[len + 8..len + 16].try_into().ok()?))
    } else {
        None
    };
    let payload = Bytes::copy_from_slice(&rest[len + fixed..]);
    let kind = match kind {
        0 => FrameKind::Text,
        1 => FrameKind::Binary,
        _ => return None,
    };
    let frame = Frame::new(kind, payload)?;
    let key = MsgKey {
        origin: Arc::from(origin),
        seq,
    };
    Some((key, live != 0, frame, position))
}

/// What reading a log found.
pub struct Log {
    /// The channel name of its first record, if it has one.
    pub name: Option<String>,
    /// The epoch of the channel's numbering, from the first record.
    pub epoch: Option<u64>,
    /// The last frames (at most the limit and the byte bound), oldest first.
    pub entries: VecDeque<Stored>,
    /// Frame records read in all.
    pub records: usize,
    /// Offset of the first damaged record, if any.
    pub damaged_at: Option<u64>,
}

/// Reads one record at `at` from `reader`: `Ok(None)` at a clean end of file, `Err` on a
/// damaged or truncated record.
fn next_record(reader: &mut impl Read) -> Result<Option<Vec<u8>>, ()> {
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let len = u32::from_le_bytes(header[..4].try_into().map_err(|_| ())?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().map_err(|_| ())?);
    if len > MAX_RECORD {
        return Err(());
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(|_| ())?;
    if crc32fast::hash(&body) != crc {
        return Err(());
    }
    Ok(Some(body))
}

/// The first record's body of the log at `path` (`None`: empty or damaged at once).
fn first_record(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut reader = BufReader::new(File::open(path)?);
    Ok(next_record(&mut reader).ok().flatten())
}

/// Reads a log streaming, keeping only its last `limit` frames within `max_bytes`.
pub fn read_log(path: &Path, limit: usize, max_bytes: usize) -> io::Result<Log> {
    read_records(path, limit, max_bytes, true)
}

fn read_records(path: &Path, limit: usize, max_bytes: usize, named: bool) -> io::Result<Log> {
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut log = Log {
        name: None,
        epoch: None,
        entries: VecDeque::new(),
        records: 0,
        damaged_at: None,
    };
    let mut at: u64 = 0;
    let mut bytes = 0;
    let mut first = named;
    loop {
        let body = match next_record(&mut reader) {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(()) => {
                log.damaged_at = Some(at);
                break;
            }
        };
        let size = 8 + body.len() as u64;
        if std::mem::take(&mut first) {
            if let Some(rest) = body.strip_prefix(NAME_MAGIC) {
                if rest.len() >= 8 {
                    let (epoch, name) = rest.split_at(8);
                    log.epoch = epoch.try_into().ok().map(u64::from_le_bytes);
                    log.name = String::from_utf8(name.to_vec()).ok();
                }
                at += size;
                continue;
            }
        }
        let Some(entry) = decode(&body, named) else {
            log.damaged_at = Some(at);
            break;
        };
        at += size;
        log.records += 1;
        bytes += entry.2.len();
        log.entries.push_back(entry);
        while log.entries.len() > limit || (bytes > max_bytes && log.entries.len() > 1) {
            if let Some(old) = log.entries.pop_front() {
                bytes -= old.2.len();
            }
        }
    }
    Ok(log)
}

/// Frame records in the log at `path`, counted by skipping from header to header.
fn count_records(path: &Path) -> io::Result<usize> {
    let mut file = File::open(path)?;
    let end = file.metadata()?.len();
    let mut at = 0;
    let mut count: usize = 0;
    let mut header = [0u8; 8];
    while at + 8 <= end {
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        at += 8 + len;
        count += 1;
    }
    // The name record is not a frame.
    Ok(count.saturating_sub(1))
}

/// Replaces the log of `channel` at `path` with exactly `entries`, atomically. Entries
/// without a position (from an older format) are numbered in order.
fn rewrite<'a>(
    path: &Path,
    channel: &str,
    epoch: u64,
    entries: impl Iterator<Item = &'a Stored>,
) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut out = Vec::new();
    name_record(channel, epoch, &mut out);
    let mut next = 1;
    for (key, live, frame, position) in entries {
        let kind = match frame.kind() {
            FrameKind::Text => 0,
            FrameKind::Binary => 1,
        };
        let position = position.unwrap_or(next);
        next = position + 1;
        encode_frame(key, *live, kind, frame.data(), position, &mut out);
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

struct Writer {
    dir: PathBuf,
    limit: usize,
    max_bytes: usize,
    logs: HashMap<Arc<str>, OpenLog>,
    /// Channels whose log could not be opened, and when that was last logged.
    failed: HashMap<Arc<str>, Instant>,
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
            w.logs
                .retain(|_, log| log.last_write.elapsed() < IDLE_CLOSE);
            w.failed.retain(|_, at| at.elapsed() < IDLE_CLOSE);
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
                let _ = fs::remove_file(log_path(&self.dir, &name));
            }
            Op::Append(channel, epoch, entry) => self.append(channel, epoch, &entry),
        }
    }

    /// Opens the log of `name` for appending: a new one starts with its name record; an
    /// existing one's records are counted, so compaction happens on time however often the
    /// log was closed and reopened.
    fn open(&mut self, name: &Arc<str>, epoch: u64) -> io::Result<OpenLog> {
        let path = log_path(&self.dir, name);
        let records = match count_records(&path) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut writer = BufWriter::new(file);
        if records.is_none() {
            let mut head = Vec::new();
            name_record(name, epoch, &mut head);
            writer.write_all(&head)?;
        }
        Ok(OpenLog {
            writer,
            records: records.unwrap_or(0),
            dirty: true,
            last_write: Instant::now(),
        })
    }

    fn append(&mut self, name: Arc<str>, epoch: u64, entry: &Entry) {
        if !self.logs.contains_key(&name) {
            match self.open(&name, epoch) {
                Ok(log) => {
                    self.logs.insert(name.clone(), log);
                }
                Err(e) => {
                    // Once a minute per channel, not once per frame.
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.failed.entry(name)
                    {
                        warn!("history of '{}' not written: {e}", slot.key());
                        slot.insert(Instant::now());
                    }
                    return;
                }
            }
        }
        let Some(log) = self.logs.get_mut(&name) else {
            return;
        };
        self.buf.clear();
        encode(entry, &mut self.buf);
        if let Err(e) = log.writer.write_all(&self.buf) {
            warn!("writing history of '{name}': {e}");
        }
        log.records += 1;
        log.dirty = true;
        log.last_write = Instant::now();
        if log.records > 2 * self.limit {
            let _ = log.writer.flush();
            self.logs.remove(&name);
            let path = log_path(&self.dir, &name);
            let compacted = read_log(&path, self.limit, self.max_bytes).and_then(|log| {
                rewrite(&path, &name, log.epoch.unwrap_or(epoch), log.entries.iter())
            });
            if let Err(e) = compacted {
                warn!("compacting history of '{name}': {e}");
            }
        }
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
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
            stream: None,
        }
    }

    #[test]
    fn records_round_trip_and_a_damaged_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut data = Vec::new();
        name_record("chan", 7, &mut data);
        encode(&entry(1, false, Frame::text("{\"uid\":\"a\"}")), &mut data);
        encode(&entry(2, true, Frame::binary(vec![0u8, 1, 2])), &mut data);
        let good = data.len();
        encode(&entry(3, true, Frame::text("lost")), &mut data);
        data[good + 10] ^= 0xff; // flip a bit in the third record
        fs::write(&path, &data).unwrap();
        let log = read_log(&path, 10, 1 << 20).unwrap();
        assert_eq!(log.name.as_deref(), Some("chan"));
        assert_eq!(log.damaged_at, Some(good as u64));
        assert_eq!(log.entries.len(), 2);
        assert!(!log.entries[0].1 && log.entries[1].1);
        assert_eq!(log.entries[1].2, Frame::binary(vec![0u8, 1, 2]));
        // Truncation mid-record is detected the same way.
        fs::write(&path, &data[..good + 5]).unwrap();
        assert_eq!(
            read_log(&path, 10, 1 << 20).unwrap().damaged_at,
            Some(good as u64)
        );
        assert_eq!(
            count_records(&path).unwrap(),
            2,
            "a torn header is no record"
        );
    }

    #[test]
    fn reading_keeps_only_the_last_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut data = Vec::new();
        name_record("c", 7, &mut data);
        for i in 0..1000 {
            encode(&entry(i, true, Frame::text(format!("m{i}"))), &mut data);
        }
        fs::write(&path, &data).unwrap();
        let log = read_log(&path, 5, 1 << 20).unwrap();
        assert_eq!(log.records, 1000);
        let got: Vec<_> = log
            .entries
            .iter()
            .map(|e| e.2.as_text().unwrap().to_string())
            .collect();
        assert_eq!(got, ["m995", "m996", "m997", "m998", "m999"]);
        assert_eq!(count_records(&path).unwrap(), 1000);
    }

    #[test]
    fn every_valid_channel_name_has_a_file_of_its_own() {
        let long = "x".repeat(256);
        let p = log_path(Path::new("/x"), &long);
        assert!(p.file_name().unwrap().len() < 64);
        assert_ne!(
            log_path(Path::new("/x"), "a"),
            log_path(Path::new("/x"), "b")
        );
    }

    #[test]
    fn a_log_closed_and_reopened_is_still_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer {
            dir: dir.path().to_path_buf(),
            limit: 5,
            max_bytes: 1 << 20,
            logs: HashMap::new(),
            failed: HashMap::new(),
            buf: Vec::new(),
        };
        let name: Arc<str> = Arc::from("c");
        for round in 0..10u64 {
            for i in 0..8 {
                w.append(
                    name.clone(),
                    7,
                    &entry(round * 8 + i, true, Frame::text("x")),
                );
            }
            flush_all(&mut w.logs, true);
            // What an idle close does.
            w.logs.clear();
            let records = count_records(&log_path(dir.path(), "c")).unwrap();
            assert!(
                records <= 2 * 5 + 16 + 1,
                "round {round}: {records} records"
            );
        }
    }

    #[test]
    fn logs_of_the_earlier_format_move_to_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let name = "old channel";
        let mut data = Vec::new();
        for i in 0..3 {
            encode(&entry(i, true, Frame::text(format!("m{i}"))), &mut data);
        }
        let old = dir.path().join(format!("{}.log", hex::encode(name)));
        fs::write(&old, &data).unwrap();
        let corrupt = Counter::default();
        migrate(dir.path(), 10, 1 << 20, &corrupt);
        assert!(!old.exists());
        let log = read_log(&log_path(dir.path(), name), 10, 1 << 20).unwrap();
        assert_eq!(log.name.as_deref(), Some(name));
        assert_eq!(log.entries.len(), 3);
        assert_eq!(corrupt.get(), 0);
    }
}
