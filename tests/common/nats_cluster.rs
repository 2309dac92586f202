//! A real NATS cluster for tests: three (or any number of) `nats-server -js` processes on
//! loopback, each with its own store directory, client port, cluster port and monitoring
//! port, routed to each other under one cluster name, as an operator runs them for
//! `--nats-replicas 3`. A cluster of one is a plain `nats-server -js`.
//!
//! Starting waits, bounded, until every node says it is ready and, for a cluster, every
//! node names the same JetStream meta leader and answers `/healthz` with ok, so a test
//! never races the cluster's own election. Nodes can be killed (SIGKILL, as a crash),
//! stopped (SIGTERM, as an operator's restart) and started again on the same ports and
//! store. The monitoring endpoint (`/jsz`, `/connz`) tells which node holds a JetStream
//! consumer and which node a client is connected to: the test kills exactly the node whose
//! loss it wants to study. Every process is killed when the cluster is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Method;

use super::http_client::Http;
use super::{free_port, wait_until, WAIT};

/// Longest wait for a cluster to elect its meta leader and report healthy after a start.
pub const CLUSTER_READY: Duration = Duration::from_secs(30);

/// The name the nodes share with `--cluster_name`.
const CLUSTER_NAME: &str = "mles-test";

/// One `nats-server` process of the cluster.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    pub monitor_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn monitor(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the node wrote to its log (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Nodes of a NATS cluster on loopback, killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes (1: a single `nats-server -js`) and waits until the cluster is
    /// ready for JetStream.
    pub async fn start(size: usize) -> NatsCluster {
        assert!(size >= 1);
        let dir = tempfile::tempdir().unwrap();
        let nodes = (1..=size)
            .map(|i| {
                let name = format!("n{i}");
                let store = dir.path().join(&name);
                std::fs::create_dir_all(&store).unwrap();
                NatsNode {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    port: free_port(),
                    cluster_port: free_port(),
                    monitor_port: free_port(),
                    store,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { nodes, _dir: dir };
        cluster.run_all().await;
        cluster
    }

    /// Replicas a stream on this cluster should have: one per node, up to 3.
    pub fn replicas(&self) -> usize {
        self.nodes.len().min(3)
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Every node's client URL, comma separated, as `--nats` takes them.
    pub fn urls_joined(&self) -> String {
        self.urls().join(",")
    }

    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Starts node `i` (again, on its ports and store) without waiting for it.
    fn spawn(&mut self, i: usize) -> u64 {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats-route://127.0.0.1:{}", n.cluster_port))
            .collect();
        let clustered = self.nodes.len() > 1;
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is running", node.name);
        // The log keeps every run; readiness is looked for after this offset.
        let offset = std::fs::metadata(&node.log).map(|m| m.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let mut command = Command::new(nats_server_binary());
        command
            .args(["-js", "-a", "127.0.0.1", "-n", &node.name])
            .args(["-p", &node.port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .arg("-sd")
            .arg(&node.store);
        if clustered {
            command
                .args(["--cluster_name", CLUSTER_NAME])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", node.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (Debian package nats-server)");
        node.child = Some(child);
        offset
    }

    /// Starts every node that is not running and waits until each says it is ready and the
    /// cluster has a JetStream meta leader that every node knows, and every node reports
    /// healthy (its JetStream assets current).
    pub async fn run_all(&mut self) {
        let stopped: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].is_running())
            .collect();
        let started: Vec<(usize, u64)> = stopped.into_iter().map(|i| (i, self.spawn(i))).collect();
        for (i, offset) in started {
            let node = &mut self.nodes[i];
            let (name, log_path) = (node.name.clone(), node.log.clone());
            let child = node.child.as_mut().expect("just started");
            wait_until(&format!("{name} to say it is ready"), WAIT, async || {
                let said = std::fs::read(&log_path).unwrap_or_default();
                let said = String::from_utf8_lossy(&said[offset as usize..]).into_owned();
                let exited = child.try_wait().unwrap();
                assert!(exited.is_none(), "{name} exited ({exited:?}):\n{said}");
                said.contains("Server is ready")
            })
            .await;
        }
        self.wait_ready().await;
    }

    /// Waits until every running node names the same meta leader (for a cluster) and
    /// answers `/healthz` with ok.
    pub async fn wait_ready(&self) {
        let clustered = self.nodes.len() > 1;
        let mut seen = String::new();
        let waited = tokio::time::timeout(CLUSTER_READY, async {
            loop {
                let mut leaders = Vec::new();
                let mut healthy = true;
                let mut now = String::new();
                for (i, node) in self.nodes.iter().enumerate() {
                    if !node.is_running() {
                        continue;
                    }
                    let leader = self.meta_leader_seen_by(i).await;
                    let health = self.get(i, "/healthz").await;
                    healthy &= health.as_ref().is_some_and(|(s, _)| *s == 200);
                    now += &format!("{}: leader {leader:?}, healthz {health:?}\n", node.name);
                    leaders.push(leader);
                }
                let agreed = !clustered
                    || (leaders.iter().all(Option::is_some)
                        && leaders.windows(2).all(|w| w[0] == w[1]));
                if agreed && healthy {
                    return;
                }
                seen = now;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        if waited.await.is_err() {
            panic!(
                "the NATS cluster was not ready within {CLUSTER_READY:?}:\n{seen}\n{}",
                self.logs()
            );
        }
    }

    /// SIGKILLs node `i`, as a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    /// Stops every node as an operator's restart does (SIGTERM): NATS writes out its store.
    /// All are signalled before any is waited for, so the cluster goes away at once.
    pub fn stop_all(&mut self) {
        let children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for child in &children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for mut child in children {
            let _ = child.wait();
        }
    }

    /// GET `path` from node `i`'s monitoring endpoint: status and body, or None when the
    /// node is down or does not answer.
    pub async fn get(&self, i: usize, path: &str) -> Option<(u16, String)> {
        let node = &self.nodes[i];
        if !node.is_running() {
            return None;
        }
        let reply = Http::plain()
            .try_send(Method::GET, node.monitor(), path, &[], b"")
            .await
            .ok()?;
        Some((reply.status.as_u16(), reply.text()))
    }

    /// Node `i`'s monitoring JSON at `path`.
    pub async fn json(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let (status, body) = self.get(i, path).await?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// The JetStream meta leader as node `i` sees it.
    pub async fn meta_leader_seen_by(&self, i: usize) -> Option<String> {
        let jsz = self.json(i, "/jsz").await?;
        let leader = jsz["meta_cluster"]["leader"].as_str()?;
        (!leader.is_empty()).then(|| leader.to_string())
    }

    /// The JetStream meta leader, as the first running node that knows one sees it.
    pub async fn meta_leader(&self) -> Option<String> {
        for i in 0..self.nodes.len() {
            if let Some(leader) = self.meta_leader_seen_by(i).await {
                return Some(leader);
            }
        }
        None
    }

    /// The leader of `stream`, as the running nodes report it.
    pub async fn stream_leader(&self, stream: &str) -> Option<String> {
        for i in 0..self.nodes.len() {
            let Some(jsz) = self.json(i, "/jsz?streams=true").await else {
                continue;
            };
            for detail in streams(&jsz) {
                if detail["name"] == stream {
                    if let Some(leader) = detail["cluster"]["leader"].as_str() {
                        return Some(leader.to_string());
                    }
                }
            }
        }
        None
    }

    /// The index of the node leading `stream`.
    pub async fn stream_leader_node(&self, stream: &str) -> usize {
        let name = self
            .stream_leader(stream)
            .await
            .expect("the stream has a leader");
        self.node_index(&name)
            .expect("the leader is one of the nodes")
    }

    /// Asks the leader of `stream` to step down (what `nats stream cluster step-down` does)
    /// and waits until another node leads it.
    pub async fn stream_leader_step_down(&self, stream: &str) {
        let before = self
            .stream_leader(stream)
            .await
            .expect("the stream has a leader");
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(NatsNode::url)
            .collect();
        let client = async_nats::connect(urls).await.expect("connect to NATS");
        let asked = client
            .request(
                format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                bytes::Bytes::new(),
            )
            .await;
        assert!(asked.is_ok(), "step-down: {asked:?}");
        wait_until("another stream leader", CLUSTER_READY, async || {
            self.stream_leader(stream)
                .await
                .is_some_and(|now| now != before)
        })
        .await;
    }

    /// The consumers of `stream` that read `subject`, and the node that holds each (for an
    /// R1 consumer, such as an ordered one, the only node that has it), by name.
    pub async fn consumers(&self, stream: &str, subject: &str) -> Vec<(String, usize)> {
        let mut found = Vec::new();
        for i in 0..self.nodes.len() {
            let Some(jsz) = self.json(i, "/jsz?consumers=true&config=true").await else {
                continue;
            };
            for detail in streams(&jsz).filter(|d| d["name"] == stream) {
                let Some(consumers) = detail["consumer_detail"].as_array() else {
                    continue;
                };
                for consumer in consumers {
                    if consumer["config"]["filter_subject"] != subject {
                        continue;
                    }
                    let name = consumer["name"].as_str().unwrap_or_default().to_string();
                    let holder = consumer["cluster"]["leader"]
                        .as_str()
                        .and_then(|leader| self.node_index(leader))
                        .unwrap_or(i);
                    if !found.iter().any(|(n, _)| *n == name) {
                        found.push((name, holder));
                    }
                }
            }
        }
        found
    }

    /// The node the client connection named `client` is connected to.
    pub async fn node_of_client(&self, client: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            let Some(connz) = self.json(i, "/connz?limit=4096").await else {
                continue;
            };
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"] == client) {
                return Some(i);
            }
        }
        None
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Every stream detail in a `/jsz?streams=true` answer.
fn streams(jsz: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
}

/// The installed `nats-server`.
fn nats_server_binary() -> &'static str {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server")
}
