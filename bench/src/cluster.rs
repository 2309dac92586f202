//! Clusters under test, every process a child of the bench on loopback: a `nats-server
//! -js` and three mles servers sharing channels through its JetStream backplane
//! (`cluster-fanout`), and three clustered `nats-server` nodes with five mles servers
//! ([`NatsCluster`], `cluster-95k`).
//!
//! The NATS server gets a fresh store directory and a port of its own, and runs in a process
//! group of its own so that it and anything it starts are killed together. Each mles server
//! runs with `--server-id sN --nats nats://127.0.0.1:<port> --limit 200` (unless
//! `--mles-arg=--limit=N` sets another) next to the flags every mles of the bench gets, and counts as started once its `/metrics` (GET over
//! loopback, which mles answers without a metrics listener) shows `mles_nats_connected 1`.
//! Every wait is bounded; on drop (a timeout drops the future that owns the cluster) every
//! process is killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::procs::{self, Kind, Launch, Server};

/// Longest wait for the NATS server to listen and for each mles to report NATS connected.
const READY: Duration = Duration::from_secs(15);
/// Longest one `/metrics` request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// The history limit of every server, and so the stream's per-subject limit, unless
/// `--mles-arg=--limit=N` sets another.
const LIMIT: &str = "200";

/// The history (and stream) limit the cluster's servers run with.
pub fn history_limit(args: &[String]) -> u64 {
    args.iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--limit") {
            Some(v) if v.starts_with('=') => v[1..].parse().ok(),
            Some("") => args.get(i + 1)?.parse().ok(),
            _ => None,
        })
        .unwrap_or_else(|| LIMIT.parse().expect("a number"))
}

/// The `nats-server` binary: Debian's, or the first one on PATH.
pub fn nats_server() -> Option<PathBuf> {
    let debian = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from);
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nats-server"));
    debian.chain(path).find(|p| p.is_file())
}

/// The running NATS server; it and its process group are killed on drop.
struct Nats {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    async fn start(binary: &Path, workdir: &Path) -> Result<Nats, String> {
        let port = procs::free_port().map_err(|e| format!("no free port: {e}"))?;
        // nats-server 2.9 has no --max_payload flag; a config file sets it.
        Nats::start_with(binary, workdir, port, "max_payload: 2MB\n".into()).await
    }

    /// Starts a node whose config file is `conf` (the client port and store come as flags).
    async fn start_with(
        binary: &Path,
        workdir: &Path,
        port: u16,
        conf_text: String,
    ) -> Result<Nats, String> {
        let dir = workdir.join(format!("nats-{port}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, conf_text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let log_path = dir.join("nats.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&conf)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut nats = Nats { child, port, dir };
        let deadline = Instant::now() + READY;
        loop {
            if let Ok(Some(status)) = nats.child.try_wait() {
                return Err(format!(
                    "nats-server exited ({status}): {}",
                    tail(&log_path)
                ));
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(nats);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server not listening after {} s: {}",
                    READY.as_secs(),
                    tail(&log_path)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the process group while the child is known to run (so its pid is still ours).
    fn kill_group(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // The child leads its own process group (process_group(0) at spawn) and is
        // unreaped, so its id is not reused.
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }

    async fn stop(mut self) {
        self.kill_group();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// A NATS server and the mles servers linked through it (s1, s2, ...).
pub struct Cluster {
    pub servers: Vec<Server>,
    nats: Option<Nats>,
}

impl Cluster {
    /// Starts `nats-server` (`binary`) and `size` mles servers, and waits until every one
    /// of them is connected to NATS.
    pub async fn start(launch: &Launch, binary: &Path, size: usize) -> Result<Cluster, String> {
        let nats = Nats::start(binary, &launch.workdir).await?;
        let url = nats.url();
        let mut cluster = Cluster {
            servers: Vec::with_capacity(size),
            nats: Some(nats),
        };
        for n in 1..=size {
            let mut extra = vec![
                "--server-id".to_string(),
                format!("s{n}"),
                "--nats".to_string(),
                url.clone(),
            ];
            // `--mles-arg=--limit=N` may set another history (and stream) limit.
            if !launch.mles_args.iter().any(|a| a.starts_with("--limit")) {
                extra.extend(["--limit".to_string(), LIMIT.to_string()]);
            }
            let server = launch
                .spawn(Kind::Mles, false, &extra)
                .await
                .map_err(|e| format!("s{n}: {e}"))?;
            cluster.servers.push(server);
        }
        for (i, server) in cluster.servers.iter_mut().enumerate() {
            wait_nats_connected(server)
                .await
                .map_err(|e| format!("s{}: {e}", i + 1))?;
        }
        Ok(cluster)
    }

    /// Every process of the cluster, mles servers first.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.servers.iter().map(|s| s.pid).collect();
        pids.extend(self.nats.as_ref().and_then(|n| n.child.id()));
        pids
    }

    /// Names of the processes of [`Cluster::pids`], in the same order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = (1..=self.servers.len()).map(|n| format!("s{n}")).collect();
        names.push("nats".into());
        names
    }

    /// Which process has died, if any.
    pub fn dead(&mut self) -> Option<String> {
        for (i, server) in self.servers.iter_mut().enumerate() {
            if !server.alive() {
                return Some(format!("mles s{} died", i + 1));
            }
        }
        match self.nats.as_mut().map(|n| n.child.try_wait()) {
            Some(Ok(None)) => None,
            _ => Some("nats-server died".into()),
        }
    }

    pub async fn stop(mut self) {
        for server in self.servers.drain(..) {
            server.stop().await;
        }
        if let Some(nats) = self.nats.take() {
            nats.stop().await;
        }
    }
}

/// Waits until the server's `/metrics` says it is connected to NATS.
pub async fn wait_nats_connected(server: &mut Server) -> Result<(), String> {
    wait_nats_connected_within(server, READY).await
}

/// [`wait_nats_connected`] with another bound.
pub async fn wait_nats_connected_within(
    server: &mut Server,
    ready: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + ready;
    loop {
        if !server.alive() {
            return Err(format!("mles exited: {}", server.log_tail()));
        }
        let last = match tokio::time::timeout(HTTP_TIMEOUT, http_get(server.addr, "/metrics")).await
        {
            Ok(Ok(text)) if text.lines().any(|l| l.trim() == "mles_nats_connected 1") => {
                return Ok(())
            }
            Ok(Ok(text)) => text
                .lines()
                .find(|l| l.starts_with("mles_nats_connected") || l.starts_with("HTTP/"))
                .unwrap_or("no mles_nats_connected in /metrics")
                .to_string(),
            Ok(Err(e)) => format!("GET /metrics: {e}"),
            Err(_) => "GET /metrics timed out".into(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "not connected to NATS after {} s ({last}): {}",
                ready.as_secs(),
                server.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET over loopback; the whole response, headers included.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Three `nats-server` nodes clustered on loopback with JetStream, and `size` mles servers
/// each given every node's URL (`--nats-replicas 3`, so the stream is replicated on all
/// three). Every process is killed on drop.
pub struct NatsCluster {
    pub servers: Vec<Server>,
    nodes: Vec<Nats>,
}

/// Nodes of a NATS cluster (JetStream needs three for replicas 3).
pub const NATS_NODES: usize = 3;

impl NatsCluster {
    pub async fn start(
        launch: &Launch,
        binary: &Path,
        size: usize,
        ready: Duration,
    ) -> Result<NatsCluster, String> {
        let ports = procs::free_ports(NATS_NODES * 2).map_err(|e| format!("no free ports: {e}"))?;
        let (client, route) = ports.split_at(NATS_NODES);
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            nodes: Vec::new(),
        };
        for n in 0..NATS_NODES {
            let routes: Vec<String> = (0..NATS_NODES)
                .filter(|&m| m != n)
                .map(|m| format!("nats-route://127.0.0.1:{}", route[m]))
                .collect();
            let conf = format!(
                "server_name: n{n}\nmax_payload: 2MB\ncluster {{\n  name: mlesbench\n  listen: \
                 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                route[n],
                routes.join(", ")
            );
            let node = Nats::start_with(binary, &launch.workdir, client[n], conf)
                .await
                .map_err(|e| format!("nats node n{n}: {e}"))?;
            cluster.nodes.push(node);
        }
        let urls: Vec<String> = cluster.nodes.iter().map(Nats::url).collect();
        for n in 1..=size {
            let mut extra = vec![
                "--server-id".to_string(),
                format!("s{n}"),
                "--nats".to_string(),
                urls.join(","),
                "--nats-replicas".to_string(),
                NATS_NODES.to_string(),
            ];
            if !launch.mles_args.iter().any(|a| a.starts_with("--limit")) {
                extra.extend(["--limit".to_string(), LIMIT.to_string()]);
            }
            let server = launch
                .spawn(Kind::Mles, false, &extra)
                .await
                .map_err(|e| format!("s{n}: {e}"))?;
            cluster.servers.push(server);
        }
        for (i, server) in cluster.servers.iter_mut().enumerate() {
            wait_nats_connected_within(server, ready)
                .await
                .map_err(|e| format!("s{}: {e}", i + 1))?;
        }
        Ok(cluster)
    }

    /// Which process has died, if any.
    pub fn dead(&mut self) -> Option<String> {
        for (i, server) in self.servers.iter_mut().enumerate() {
            if !server.alive() {
                return Some(format!("mles s{} died: {}", i + 1, server.log_tail()));
            }
        }
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if !matches!(node.child.try_wait(), Ok(None)) {
                return Some(format!("nats node n{i} died"));
            }
        }
        None
    }

    pub async fn stop(mut self) {
        for server in self.servers.drain(..) {
            server.stop().await;
        }
        for node in self.nodes.drain(..) {
            node.stop().await;
        }
    }
}
