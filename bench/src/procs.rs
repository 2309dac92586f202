//! The servers under test as child processes, and what /proc says about them.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::relay::Design;

/// Which server a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mles,
    /// `mles-bench relay --design ...`: a minimal relay, the ceiling.
    Relay(Design),
    /// A server this bench did not start (`--server`).
    External,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mles => "mles",
            Kind::Relay(Design::Queues) => "relay-queues",
            Kind::Relay(Design::Ring) => "relay-ring",
            Kind::External => "server",
        }
    }

    pub fn is_relay(self) -> bool {
        matches!(self, Kind::Relay(_))
    }
}

/// How to start each server.
pub struct Launch {
    pub mles: PathBuf,
    pub mles_args: Vec<String>,
    pub relay: PathBuf,
    /// For cluster scenarios; None when there is none.
    pub nats_server: Option<PathBuf>,
    pub workdir: PathBuf,
}

/// A running server child; killed on drop if not stopped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    log: PathBuf,
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free ports: every listener is held until all are chosen, so the kernel
/// cannot hand out one port twice.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

impl Launch {
    pub async fn start(&self, kind: Kind, tls: bool) -> Result<Server, String> {
        self.spawn(kind, tls, &[]).await
    }

    /// Starts a server; `extra` flags go to mles before the bench's own mles flags.
    pub async fn spawn(&self, kind: Kind, tls: bool, extra: &[String]) -> Result<Server, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let www = self.workdir.join("www");
        std::fs::create_dir_all(&www).map_err(|e| format!("{}: {e}", www.display()))?;
        let log = self.workdir.join(format!("{}-{port}.log", kind.name()));
        let mut cmd = match kind {
            Kind::Mles => {
                let mut cmd = Command::new(&self.mles);
                cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                    .arg("--wwwroot")
                    .arg(&www);
                if tls {
                    cmd.args(["--tls", "self-signed", "--domains", "localhost"]);
                } else {
                    cmd.args(["--tls", "off"]);
                }
                cmd.args(extra).args(&self.mles_args);
                cmd.env("RUST_LOG", "warn");
                cmd
            }
            Kind::External => return Err("an external server is not started".into()),
            Kind::Relay(design) => {
                let mut cmd = Command::new(&self.relay);
                cmd.args(["relay", "--bind", "127.0.0.1", "--port", &port.to_string()]);
                cmd.arg(match design {
                    Design::Queues => "--design=queues",
                    Design::Ring => "--design=ring",
                });
                if tls {
                    cmd.arg("--tls");
                }
                cmd
            }
        };
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kind.name()))?;
        let pid = child.id().ok_or("child has no pid")?;
        let mut server = Server {
            child,
            addr,
            pid,
            log,
        };
        server.wait_ready().await?;
        Ok(server)
    }
}

impl Server {
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("server exited ({status}): {}", self.log_tail()));
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "server not listening after 15 s: {}",
            self.log_tail()
        ))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// True while the child runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Resident memory of a process in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time a process has used in nanoseconds: the sum of its threads' run time from
/// /proc/<pid>/task/*/schedstat (nanosecond resolution, unlike utime/stime).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Busy CPU time of the whole machine in seconds (all processes, ours and others'), from
/// /proc/stat: everything but idle and iowait.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    // USER_HZ is 100 on Linux.
    Some((total - idle) as f64 / 100.0)
}

/// The mles binary next to this one (target/release/mles after `cargo build --release`).
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// Raises the soft open-files limit to the hard one; children inherit it. Returns the soft
/// limit in force afterwards (0 if unknown or unlimited).
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum || (limit.current.is_some() && limit.maximum.is_none()) {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum.unwrap_or(0);
        }
    }
    limit.current.unwrap_or(0)
}
