//! Logs an operator can read: the process logger (`--log-format text|json`), a hard cap on
//! what chatty dependencies may log, and rate-limited "notable events" (refused joins,
//! refused connections, limit hits, slow consumers) logged at `info` with the reason and the
//! client's address.
//!
//! A leaf module: it uses nothing from the rest of the crate, so every other module can
//! report through it.
//!
//! **Why env_logger and not `tracing`.** Everything here logs through the `log` facade;
//! env_logger already parses `RUST_LOG` and writes whole records to stderr under one lock,
//! and the few dependencies that use `tracing` (async-nats, hyper-util, warp) reach it
//! through tracing's own `log` bridge. JSON lines are a small formatter over serde_json
//! (already a dependency), with key-value fields from `log`'s `kv` feature. Moving to
//! tracing-subscriber would add a subscriber stack and a log bridge for the same output.
//!
//! **Secrets.** The auth key (`MLES_KEY`) and join-frame auth tokens must never reach a log
//! line at any level. mles itself never formats them; but at `debug`/`trace` tungstenite
//! prints every WebSocket frame (a join frame carries the token, a peer link's join frame
//! its own), async-nats prints its CONNECT line (credentials), and hyper, warp and rustls
//! print headers and handshake details. [`CAPPED`] lists those crates: they log at `info`
//! at most, whatever `RUST_LOG` asks for. The cap sits in front of env_logger's filter, so
//! no `RUST_LOG` directive (however specific) can lift it.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per record (env_logger's format).
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `target`, `message` and, when the
    /// record has any, `fields`.
    Json,
}

/// Crates (log targets, with their submodules) whose `debug`/`trace` output can carry a
/// secret: WebSocket frame payloads, HTTP headers, NATS credentials, TLS handshake details.
/// `tracing` covers span records that tracing's log bridge emits.
pub const CAPPED: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "warp",
    "rustls",
    "tokio_rustls",
    "async_nats",
    "nkeys",
    "tracing",
];

/// The most a [`CAPPED`] crate may log.
const CAP: Level = Level::Info;

/// The log target of notable events, so that `RUST_LOG=warn,mles::notable=info` keeps them
/// and `mles::notable=off` silences them.
pub const NOTABLE_TARGET: &str = "mles::notable";

/// Whether `target` is one of the [`CAPPED`] crates or a module inside one.
fn capped(target: &str) -> bool {
    CAPPED.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Whether a record of this level and target may be logged at all.
fn allowed(metadata: &Metadata<'_>) -> bool {
    metadata.level() <= CAP || !capped(metadata.target())
}

/// env_logger behind the cap.
struct Capped {
    inner: env_logger::Logger,
}

impl Log for Capped {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        allowed(metadata) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if allowed(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The logging set up by [`init`] could not be installed (a logger was already set).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the logger: {0}")]
pub struct InitError(#[from] log::SetLoggerError);

/// Installs the process logger: `RUST_LOG` filters as with env_logger (default `info`),
/// [`CAPPED`] crates are held to `info`, records go to stderr in `format`.
pub fn init(format: LogFormat) -> Result<(), InitError> {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = json_line(&buf.timestamp_millis().to_string(), record);
            writeln!(buf, "{line}")
        });
    }
    let inner = builder.build();
    let max = inner.filter();
    log::set_boxed_logger(Box::new(Capped { inner }))?;
    log::set_max_level(max);
    Ok(())
}

/// One record as a JSON object (without the newline).
fn json_line(time: &str, record: &Record<'_>) -> String {
    let mut object = serde_json::Map::new();
    object.insert("time".into(), time.into());
    object.insert("level".into(), record.level().as_str().into());
    object.insert("target".into(), record.target().into());
    object.insert("message".into(), record.args().to_string().into());
    let mut fields = Fields(serde_json::Map::new());
    // A source that fails half way still leaves the fields read so far.
    let _ = record.key_values().visit(&mut fields);
    if !fields.0.is_empty() {
        object.insert("fields".into(), fields.0.into());
    }
    serde_json::Value::Object(object).to_string()
}

/// Collects a record's key-value pairs as JSON values (numbers and booleans stay typed).
struct Fields(serde_json::Map<String, serde_json::Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let json = if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else {
            value.to_string().into()
        };
        self.0.insert(key.as_str().to_string(), json);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Notable events

/// Something an operator should see at the default level, though it is no fault of the
/// server: a client was refused or cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Notable {
    /// A WebSocket's join frame was refused: bad frame, failed auth, duplicate uid, full
    /// channel, the server's channel limit.
    JoinRefused,
    /// A connection was refused before TLS or HTTP work (accept rate, per-address cap,
    /// connection limit), or its WebSocket upgrade was refused.
    ConnectionRefused,
    /// A joined client was closed for going over a limit (message rate, channel message
    /// limit, message size).
    LimitHit,
    /// A member was closed for falling behind its channel or stalling writes.
    SlowConsumer,
}

impl Notable {
    /// The `event` field of the log line.
    pub fn name(self) -> &'static str {
        match self {
            Notable::JoinRefused => "join_refused",
            Notable::ConnectionRefused => "connection_refused",
            Notable::LimitHit => "limit_hit",
            Notable::SlowConsumer => "slow_consumer",
        }
    }

    fn sentence(self, client: &str, detail: &str) -> String {
        match self {
            Notable::JoinRefused => format!("refused join from {client}: {detail}"),
            Notable::ConnectionRefused => format!("refused connection from {client}: {detail}"),
            Notable::LimitHit => format!("closed {client} (limit): {detail}"),
            Notable::SlowConsumer => format!("closed {client} (slow consumer): {detail}"),
        }
    }
}

/// How long a reason's line stands for the ones like it that follow.
pub const FOLD_WINDOW: Duration = Duration::from_secs(1);

/// Logs a notable event at `info` on [`NOTABLE_TARGET`]: `reason` is a short stable label
/// (the key for rate limiting and the `reason` field, e.g. `auth`), `detail` the words a
/// person reads (e.g. `authentication failed`), `client` the remote address.
///
/// At most one line per (event, reason) per [`FOLD_WINDOW`]: the first is logged at once;
/// the ones that follow within the window are folded into one line logged when the window
/// ends, which names the last of them and says how many more it stands for (`folded`).
/// So every event is accounted for, and a flood costs one line per reason per second.
pub fn notable(event: Notable, reason: &'static str, detail: &str, client: Option<SocketAddr>) {
    let folder = FOLDER.get_or_init(Folder::default);
    let happened = Happened {
        detail: detail.to_string(),
        client,
    };
    if let Some(line) = folder.record((event, reason), happened, Instant::now()) {
        emit(&line);
    } else {
        folder.ensure_flusher();
    }
}

static FOLDER: OnceLock<Folder> = OnceLock::new();

type Key = (Notable, &'static str);

/// One event as it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Happened {
    detail: String,
    client: Option<SocketAddr>,
}

/// A line to log: an event and how many more like it it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Line {
    event: Notable,
    reason: &'static str,
    happened: Happened,
    folded: u64,
}

impl Line {
    /// The message of the log line.
    fn message(&self) -> String {
        let client = self
            .happened
            .client
            .map_or_else(|| "an unknown address".to_string(), |c| c.to_string());
        let mut text = self.event.sentence(&client, &self.happened.detail);
        if self.folded > 0 {
            text.push_str(&format!(
                " (and {} more like it in the last second)",
                self.folded
            ));
        }
        text
    }
}

fn emit(line: &Line) {
    let client = line
        .happened
        .client
        .map_or_else(String::new, |c| c.to_string());
    log::info!(
        target: NOTABLE_TARGET,
        event = line.event.name(),
        reason = line.reason,
        client = client.as_str(),
        folded = line.folded;
        "{}",
        line.message()
    );
}

/// Per (event, reason): when its current window ends, and what was folded into it.
struct Slot {
    window_end: Instant,
    folded: u64,
    last: Option<Happened>,
}

/// The rate limiter behind [`notable`]; time is passed in, so it is tested without waiting.
#[derive(Default)]
struct Folder {
    slots: Mutex<HashMap<Key, Slot>>,
    wake: Condvar,
    flusher: OnceLock<()>,
}

impl Folder {
    /// Takes one event at `now`: returns the line to log now, or `None` when it was
    /// folded into its reason's open window.
    fn record(&self, key: Key, happened: Happened, now: Instant) -> Option<Line> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(&key) {
            Some(slot) if now < slot.window_end || slot.folded > 0 => {
                slot.folded += 1;
                slot.last = Some(happened);
                self.wake.notify_one();
                None
            }
            _ => {
                slots.insert(
                    key,
                    Slot {
                        window_end: now + FOLD_WINDOW,
                        folded: 0,
                        last: None,
                    },
                );
                Some(Line {
                    event: key.0,
                    reason: key.1,
                    happened,
                    folded: 0,
                })
            }
        }
    }

    /// The folded lines whose window has ended by `now` (each then opens a new window, so
    /// a steady flood gives one line per window), and when the next one is due. Reasons
    /// that stayed quiet through their window are forgotten.
    #[cfg(test)]
    fn due(&self, now: Instant) -> (Vec<Line>, Option<Instant>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Folder::take_due(&mut slots, now)
    }

    fn take_due(slots: &mut HashMap<Key, Slot>, now: Instant) -> (Vec<Line>, Option<Instant>) {
        let mut lines = Vec::new();
        slots.retain(|key, slot| {
            if slot.window_end > now {
                return true;
            }
            match slot.last.take() {
                Some(happened) => {
                    lines.push(Line {
                        event: key.0,
                        reason: key.1,
                        happened,
                        folded: slot.folded - 1,
                    });
                    slot.folded = 0;
                    slot.window_end = now + FOLD_WINDOW;
                    true
                }
                None => false,
            }
        });
        let next = slots
            .values()
            .filter(|s| s.folded > 0)
            .map(|s| s.window_end)
            .min();
        (lines, next)
    }

    /// Starts the thread that logs folded lines when their window ends (once per process).
    fn ensure_flusher(&'static self) {
        self.flusher.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("mles-notable".into())
                .spawn(move || self.flush_forever());
            if let Err(e) = spawned {
                log::warn!("notable events: cannot start the flusher thread: {e}");
            }
        });
    }

    /// Sleeps until the next folded line is due, logs it, and so on.
    fn flush_forever(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let (lines, next) = Folder::take_due(&mut slots, now);
            if !lines.is_empty() {
                drop(slots);
                for line in &lines {
                    emit(line);
                }
                slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            slots = match next {
                Some(at) => {
                    self.wake
                        .wait_timeout(slots, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(slots).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// Whether records of `level` from `target` pass the secret cap (the installed logger
/// applies it to every record).
#[cfg(test)]
fn passes_cap(target: &str, level: Level) -> bool {
    allowed(&Metadata::builder().target(target).level(level).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(client: u16) -> Happened {
        Happened {
            detail: "authentication failed".into(),
            client: Some(SocketAddr::from(([127, 0, 0, 1], client))),
        }
    }

    const AUTH: Key = (Notable::JoinRefused, "auth");
    const FULL: Key = (Notable::JoinRefused, "channel_full");

    #[test]
    fn the_cap_holds_chatty_crates_to_info_and_leaves_others_alone() {
        for target in [
            "tungstenite",
            "tungstenite::protocol",
            "tokio_tungstenite",
            "async_nats::connection",
            "hyper_util::client",
            "rustls::server::hs",
            "tracing::span",
        ] {
            assert!(passes_cap(target, Level::Info), "{target}");
            assert!(passes_cap(target, Level::Warn), "{target}");
            assert!(!passes_cap(target, Level::Debug), "{target}");
            assert!(!passes_cap(target, Level::Trace), "{target}");
        }
        for target in [
            "mles::session",
            "mles",
            "rustls_acme",
            "tungstenitex",
            "hyperx",
        ] {
            assert!(passes_cap(target, Level::Trace), "{target}");
        }
    }

    #[test]
    fn the_first_event_is_logged_at_once_and_the_rest_fold_into_one_line_per_window() {
        let folder = Folder::default();
        let t0 = Instant::now();
        let first = folder.record(AUTH, at(1), t0).expect("logged at once");
        assert_eq!(first.folded, 0);
        assert_eq!(
            first.message(),
            "refused join from 127.0.0.1:1: authentication failed"
        );
        // Another reason is not held back by the first.
        assert!(folder.record(FULL, at(9), t0).is_some());
        for i in 2..=38 {
            let t = t0 + Duration::from_millis(i * 10);
            assert!(folder.record(AUTH, at(i as u16), t).is_none());
        }
        let (lines, next) = folder.due(t0 + Duration::from_millis(500));
        assert!(lines.is_empty());
        assert_eq!(next, Some(t0 + FOLD_WINDOW));
        let end = t0 + FOLD_WINDOW;
        let (lines, next) = folder.due(end);
        assert_eq!(lines.len(), 1, "one line for the folded ones");
        assert_eq!(
            lines[0].folded, 36,
            "37 folded: the line names one, 36 more"
        );
        assert_eq!(
            lines[0].message(),
            "refused join from 127.0.0.1:38: authentication failed \
             (and 36 more like it in the last second)"
        );
        // The quiet reason was forgotten; the flooded one opened a new window.
        assert_eq!(next, None);
        assert!(folder.record(AUTH, at(40), end).is_none());
        assert!(folder.record(FULL, at(41), end).is_some());
        let (lines, _) = folder.due(end + FOLD_WINDOW);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].folded, 0);
        // Quiet through a whole window: the next event is logged at once again.
        let (lines, next) = folder.due(end + FOLD_WINDOW * 2);
        assert!(lines.is_empty() && next.is_none());
        assert!(folder.record(AUTH, at(50), end + FOLD_WINDOW * 3).is_some());
    }

    #[test]
    fn json_lines_carry_level_target_message_and_typed_fields() {
        let kvs: [(&str, log::kv::Value<'_>); 3] = [
            ("reason", log::kv::Value::from("auth")),
            ("folded", log::kv::Value::from(37u64)),
            ("client", log::kv::Value::from("127.0.0.1:1")),
        ];
        let record = Record::builder()
            .level(Level::Info)
            .target(NOTABLE_TARGET)
            .args(format_args!("refused join"))
            .key_values(&kvs)
            .build();
        let line = json_line("2025-01-01T00:00:00.000Z", &record);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "mles::notable");
        assert_eq!(v["message"], "refused join");
        assert_eq!(v["time"], "2025-01-01T00:00:00.000Z");
        assert_eq!(v["fields"]["reason"], "auth");
        assert_eq!(v["fields"]["folded"], 37);
        assert_eq!(v["fields"]["client"], "127.0.0.1:1");
        let plain = Record::builder()
            .level(Level::Warn)
            .target("mles::server")
            .args(format_args!("a \"quoted\"\nline"))
            .build();
        let v: serde_json::Value = serde_json::from_str(&json_line("t", &plain)).unwrap();
        assert_eq!(v["message"], "a \"quoted\"\nline");
        assert!(v.get("fields").is_none());
    }
}
