//! Command line and environment: every flag of the server, parsed by clap and validated into
//! a plain [`Config`]. This is the only module that reads the process environment.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use async_nats::ServerAddr;
use http::Uri;

use crate::{protocol, Error};

/// How the listener speaks to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    /// Certificates from an ACME CA (Let's Encrypt by default) via TLS-ALPN-01.
    Acme,
    /// A certificate made at start for the configured domains (local use and tests).
    SelfSigned,
    /// Own PEM files given with --cert and --key.
    Files,
    /// Plain HTTP and WebSocket, for running behind a TLS-terminating proxy.
    Off,
}

/// Flags as the user writes them. Every flag also reads `MLES_<FLAG>`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "mles",
    version = crate::version::LONG,
    about = "Mles v2 pub/sub relay over TLS WebSockets"
)]
pub struct Args {
    /// Domain to serve (repeatable, or comma separated); ACME orders a certificate for each.
    #[arg(
        short = 'd',
        long = "domains",
        env = "MLES_DOMAINS",
        value_delimiter = ','
    )]
    pub domains: Vec<String>,
    /// Contact email for the ACME account (repeatable).
    #[arg(short = 'e', long = "email", env = "MLES_EMAIL", value_delimiter = ',')]
    pub email: Vec<String>,
    /// Directory for the ACME account, certificates and persisted history.
    #[arg(short = 'c', long = "cache", env = "MLES_CACHE")]
    pub cache: Option<PathBuf>,
    /// Frames of history kept per channel and replayed to each new member.
    #[arg(short = 'l', long = "limit", env = "MLES_LIMIT", default_value_t = 200)]
    pub limit: usize,
    /// Static files root; requests for host H are served from <wwwroot>/H/.
    #[arg(
        short = 'w',
        long = "wwwroot",
        env = "MLES_WWWROOT",
        default_value = "static"
    )]
    pub wwwroot: PathBuf,
    /// Use the Let's Encrypt staging directory.
    #[arg(short = 's', long = "staging", env = "MLES_STAGING")]
    pub staging: bool,
    /// Port of the main listener.
    #[arg(short = 'p', long = "port", env = "MLES_PORT", default_value_t = 443)]
    pub port: u16,
    /// Also listen on --redirect-port and redirect HTTP to HTTPS for the configured domains.
    #[arg(short = 'r', long = "redirect", env = "MLES_REDIRECT")]
    pub redirect: bool,
    /// Port of the HTTP-to-HTTPS redirect listener.
    #[arg(
        long = "redirect-port",
        env = "MLES_REDIRECT_PORT",
        default_value_t = 80
    )]
    pub redirect_port: u16,
    /// Address to bind; default all interfaces, IPv6 and IPv4.
    #[arg(long = "bind", env = "MLES_BIND")]
    pub bind: Option<IpAddr>,
    /// TLS mode: acme (default with --domains), self-signed, files (default with --cert), off.
    #[arg(long = "tls", env = "MLES_TLS", value_enum)]
    pub tls: Option<TlsMode>,
    /// PEM certificate chain (with --key).
    #[arg(long = "cert", env = "MLES_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key (with --cert).
    #[arg(long = "key", env = "MLES_KEY_FILE")]
    pub key: Option<PathBuf>,
    /// ACME directory URL (overrides Let's Encrypt production and staging).
    #[arg(long = "acme-directory", env = "MLES_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// PEM CA certificate to trust for the ACME directory (private or test CAs).
    #[arg(long = "acme-ca", env = "MLES_ACME_CA")]
    pub acme_ca: Option<PathBuf>,
    /// Largest accepted WebSocket message in bytes; larger ones close the connection (1009).
    #[arg(long = "max-message-size", env = "MLES_MAX_MESSAGE_SIZE", default_value_t = 2 * 1024 * 1024)]
    pub max_message_size: usize,
    /// Frames a member may fall behind its channel before it is disconnected as too slow.
    #[arg(
        long = "queue-frames",
        env = "MLES_QUEUE_FRAMES",
        default_value_t = 1024
    )]
    pub queue_frames: usize,
    /// Bytes a channel buffers for history and for members catching up.
    #[arg(long = "channel-bytes", env = "MLES_CHANNEL_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub channel_bytes: usize,
    /// Seconds an idle channel (no members, no traffic) keeps its history.
    #[arg(long = "history-expiry", env = "MLES_HISTORY_EXPIRY", default_value_t = 30 * 24 * 3600)]
    pub history_expiry: u64,
    /// Seconds a new WebSocket has to send its join frame.
    #[arg(
        long = "first-frame-timeout",
        env = "MLES_FIRST_FRAME_TIMEOUT",
        default_value_t = 10
    )]
    pub first_frame_timeout: u64,
    /// Seconds a TCP connection has to finish its TLS handshake and first HTTP request.
    #[arg(
        long = "handshake-timeout",
        env = "MLES_HANDSHAKE_TIMEOUT",
        default_value_t = 10
    )]
    pub handshake_timeout: u64,
    /// Seconds between pings to a quiet connection.
    #[arg(
        long = "ping-interval",
        env = "MLES_PING_INTERVAL",
        default_value_t = 20
    )]
    pub ping_interval: u64,
    /// Pings in a row without any answer before the connection is dropped.
    #[arg(long = "missed-pongs", env = "MLES_MISSED_PONGS", default_value_t = 3)]
    pub missed_pongs: u32,
    /// Seconds a write to a member may stall before it is disconnected as too slow.
    #[arg(
        long = "write-timeout",
        env = "MLES_WRITE_TIMEOUT",
        default_value_t = 30
    )]
    pub write_timeout: u64,
    /// Peer server to link channels with, ws:// or wss:// (repeatable, or comma separated).
    #[arg(long = "peer", env = "MLES_PEER", value_delimiter = ',')]
    pub peer: Vec<String>,
    /// PEM CA certificate to trust for wss:// peers with private certificates.
    #[arg(long = "peer-ca", env = "MLES_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// Seconds a peer link stays up after its channel's last local client left.
    #[arg(long = "peer-grace", env = "MLES_PEER_GRACE", default_value_t = 30)]
    pub peer_grace: u64,
    /// This server's identity on peer links (its uid there); default: the host name.
    #[arg(long = "server-id", env = "MLES_SERVER_ID")]
    pub server_id: Option<String>,
    /// Answer peer links as a plain mles v2 server would, without envelopes (for
    /// interoperability testing).
    #[arg(
        long = "plain-peer-protocol",
        env = "MLES_PLAIN_PEER_PROTOCOL",
        hide = true
    )]
    pub plain_peer_protocol: bool,
    /// NATS server with JetStream to share channels and history through with every server
    /// of a cluster, e.g. nats://host:4222 or tls://user:pass@host (repeatable, or comma
    /// separated). Not together with --peer.
    #[arg(long = "nats", env = "MLES_NATS", value_delimiter = ',')]
    pub nats: Vec<String>,
    /// NATS credentials file (JWT and NKey seed) for --nats.
    #[arg(long = "nats-creds", env = "MLES_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// PEM CA certificate to trust for NATS servers with private certificates.
    #[arg(long = "nats-ca", env = "MLES_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients (with --nats-client-key).
    #[arg(long = "nats-client-cert", env = "MLES_NATS_CLIENT_CERT")]
    pub nats_client_cert: Option<PathBuf>,
    /// PEM private key of --nats-client-cert.
    #[arg(long = "nats-client-key", env = "MLES_NATS_CLIENT_KEY")]
    pub nats_client_key: Option<PathBuf>,
    /// Replicas of the JetStream stream holding channel history (in a NATS cluster).
    #[arg(
        long = "nats-replicas",
        env = "MLES_NATS_REPLICAS",
        default_value_t = 1
    )]
    pub nats_replicas: usize,
    /// New connections accepted per minute from one IP address, an IPv6 /64 counting as
    /// one (0: no limit).
    #[arg(long = "ip-rate", env = "MLES_IP_RATE", default_value_t = 600)]
    pub ip_rate: u32,
    /// Connections one IP address (IPv6: one /64) may hold open at once (0: no limit).
    /// Behind a reverse proxy every client has the proxy's address: set 0 there and limit
    /// at the proxy.
    #[arg(
        long = "per-ip-limit",
        env = "MLES_PER_IP_LIMIT",
        default_value_t = 128
    )]
    pub per_ip_limit: u32,
    /// Frames a client may send per --message-window; over it the connection is closed
    /// with 1008 (0: no limit). Peer links are exempt.
    #[arg(
        long = "message-rate",
        env = "MLES_MESSAGE_RATE",
        default_value_t = 1000
    )]
    pub message_rate: u32,
    /// Seconds in a --message-rate window.
    #[arg(
        long = "message-window",
        env = "MLES_MESSAGE_WINDOW",
        default_value_t = 1
    )]
    pub message_window: u64,
    /// Seconds a client may send no frames before it is closed (0: never).
    #[arg(long = "idle-timeout", env = "MLES_IDLE_TIMEOUT", default_value_t = 0)]
    pub idle_timeout: u64,
    /// Seconds a client connection may last before it is closed (0: no limit).
    #[arg(
        long = "max-connection-age",
        env = "MLES_MAX_CONNECTION_AGE",
        default_value_t = 0
    )]
    pub max_connection_age: u64,
    /// Most clients joined to one channel (0: no limit).
    #[arg(
        long = "channel-max-members",
        env = "MLES_CHANNEL_MAX_MEMBERS",
        default_value_t = 0
    )]
    pub channel_max_members: usize,
    /// Most frames clients may publish to one channel (0: no limit).
    #[arg(
        long = "channel-max-messages",
        env = "MLES_CHANNEL_MAX_MESSAGES",
        default_value_t = 0
    )]
    pub channel_max_messages: u64,
    /// Seconds a channel lives from its creation; then its members are closed and its name
    /// starts afresh (0: forever).
    #[arg(
        long = "channel-lifespan",
        env = "MLES_CHANNEL_LIFESPAN",
        default_value_t = 0
    )]
    pub channel_lifespan: u64,
    /// Most channels held at once; past it the least recently active channel without
    /// members is dropped, and when every channel has members new ones are refused (1013).
    #[arg(
        long = "max-channels",
        env = "MLES_MAX_CHANNELS",
        default_value_t = 100_000
    )]
    pub max_channels: usize,
    /// Most connections open at once; more are refused before any TLS work.
    #[arg(
        long = "max-connections",
        env = "MLES_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,
    /// MiB of memory for compressed static files (0: compress every time, cache nothing).
    #[arg(
        long = "static-cache-mb",
        env = "MLES_STATIC_CACHE_MB",
        default_value_t = 32
    )]
    pub static_cache_mb: usize,
    /// Reverse-proxy rule PREFIX=http://HOST:PORT[/PATH] (repeatable, or comma separated):
    /// requests under /PREFIX go to the upstream with the prefix stripped.
    #[arg(long = "proxy", env = "MLES_PROXY", value_delimiter = ',')]
    pub proxy: Vec<String>,
    /// Memory budget for everything clients can make the server hold: history, frames
    /// being received and queued, connections, static responses, links (e.g. 512M, 2G;
    /// default: half of physical memory, at most 4G).
    #[arg(long = "max-memory", env = "MLES_MAX_MEMORY", value_parser = crate::budget::parse_size)]
    pub max_memory: Option<usize>,
    /// Serve /metrics (and /health) on this plain-HTTP ADDR:PORT only.
    #[arg(long = "metrics-bind", env = "MLES_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// Also answer /metrics on the main listener, to loopback clients only. Off by default:
    /// behind a local reverse proxy every client is a loopback client.
    #[arg(
        long = "metrics-on-main",
        env = "MLES_METRICS_ON_MAIN",
        conflicts_with = "metrics_bind"
    )]
    pub metrics_on_main: bool,
    /// Log line format on stderr: text, or json (one object per line with time, level,
    /// target, message and fields). Levels come from RUST_LOG (default info).
    #[arg(
        long = "log-format",
        env = "MLES_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: crate::logging::LogFormat,
}

/// The secrets, read only from the environment (never flags, never logged).
#[derive(Clone, Default)]
pub struct Secrets {
    /// `MLES_KEY`: the key clients compute their auth tokens with.
    pub key: Option<String>,
    /// `MLES_PEER_KEY`: the secret only peer servers share.
    pub peer_key: Option<String>,
}

impl Secrets {
    /// `MLES_KEY` and `MLES_PEER_KEY` from the process environment; empty means unset.
    pub fn from_env() -> Secrets {
        let var = |name| std::env::var(name).ok().filter(|k: &String| !k.is_empty());
        Secrets {
            key: var("MLES_KEY"),
            peer_key: var("MLES_PEER_KEY"),
        }
    }
}

/// Smallest memory budget accepted.
pub const MIN_MEMORY: usize = 16 << 20;

/// Shortest peer key accepted: it is the only thing between a client and peer powers.
pub const MIN_PEER_KEY_LEN: usize = 16;

/// Validated settings the server runs with.
#[derive(Clone)]
pub struct Config {
    pub domains: Vec<String>,
    pub email: Vec<String>,
    pub cache: Option<PathBuf>,
    pub wwwroot: PathBuf,
    pub listen: SocketAddr,
    pub redirect: Option<SocketAddr>,
    pub tls: TlsConfig,
    /// Shared secret for first-frame auth, from `MLES_KEY`; never logged.
    pub key: Option<String>,
    /// Secret peer servers prove on every link, from `MLES_PEER_KEY`; without it this
    /// server neither opens nor accepts peer links.
    pub peer_key: Option<protocol::PeerKey>,
    pub hub: HubConfig,
    /// The memory budget, in bytes.
    pub max_memory: usize,
    pub session: SessionConfig,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// New connections per minute per IP address.
    pub ip_rate: Option<u32>,
    /// Connections open at once per IP address.
    pub per_ip_limit: Option<u32>,
    /// Bytes of compressed static files kept in memory.
    pub static_cache_bytes: usize,
    /// Reverse-proxy rules, in the order given.
    pub proxies: Vec<crate::proxy::ProxyRule>,
    /// The separate metrics listener; when set, /metrics is not served on the main one.
    pub metrics_bind: Option<SocketAddr>,
    /// Whether /metrics is answered on the main listener (to loopback clients).
    pub metrics_on_main: bool,
    pub peers: PeerConfig,
    /// This server's uid on peer links and the origin of its clients' frames.
    pub server_id: String,
    /// Whether links from servers of this kind get envelopes (off only to act as mles v2).
    pub peer_envelopes: bool,
    /// The NATS JetStream backplane, with `--nats`.
    pub nats: Option<NatsConfig>,
    /// How log lines are written (read by main before logging starts).
    pub log_format: crate::logging::LogFormat,
}

#[derive(Clone, Debug)]
pub enum TlsConfig {
    Off,
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    Acme {
        staging: bool,
        directory: Option<String>,
        ca: Option<PathBuf>,
    },
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("domains", &self.domains)
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("wwwroot", &self.wwwroot)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .field("peer_key", &self.peer_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Parses the process arguments and environment; exits with clap's message on bad syntax.
    pub fn from_env() -> Result<Config, Error> {
        Config::from_args(Args::parse(), Secrets::from_env())
    }

    /// Validates parsed flags and the secrets.
    pub fn from_args(args: Args, secrets: Secrets) -> Result<Config, Error> {
        let Secrets { key, peer_key } = secrets;
        let bad = |msg: String| Err(Error::Config(msg));
        let domains: Vec<String> = args
            .domains
            .iter()
            .map(|d| d.trim().to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        if let Some(d) = domains.iter().find(|d| !valid_domain(d)) {
            return bad(format!("invalid domain name '{d}'"));
        }
        let mode = match (args.tls, &args.cert) {
            (Some(m), _) => m,
            (None, Some(_)) => TlsMode::Files,
            (None, None) if !domains.is_empty() => TlsMode::Acme,
            (None, None) => TlsMode::SelfSigned,
        };
        let tls = match mode {
            TlsMode::Off => TlsConfig::Off,
            TlsMode::SelfSigned => TlsConfig::SelfSigned,
            TlsMode::Files => match (&args.cert, &args.key) {
                (Some(cert), Some(key)) => {
                    for f in [cert, key] {
                        if let Err(e) = std::fs::metadata(f) {
                            return bad(format!("cannot read '{}': {e}", f.display()));
                        }
                    }
                    TlsConfig::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    }
                }
                _ => return bad("--tls files needs both --cert and --key".into()),
            },
            TlsMode::Acme => {
                if domains.is_empty() {
                    return bad("--tls acme needs at least one --domains entry".into());
                }
                if let Some(ca) = &args.acme_ca {
                    if let Err(e) = std::fs::metadata(ca) {
                        return bad(format!("cannot read '{}': {e}", ca.display()));
                    }
                }
                TlsConfig::Acme {
                    staging: args.staging,
                    directory: args.acme_directory.clone(),
                    ca: args.acme_ca.clone(),
                }
            }
        };
        if mode != TlsMode::Files && (args.cert.is_some() || args.key.is_some()) {
            return bad(format!("--cert/--key do not go with --tls {mode:?}").to_lowercase());
        }
        // Without domains a local server answers on every loopback name, from the
        // `localhost` folder, with a self-signed certificate naming each of them.
        let domains = if domains.is_empty() {
            crate::static_files::LOOPBACK_NAMES
                .iter()
                .map(|name| name.to_string())
                .collect()
        } else {
            domains
        };
        if !args.wwwroot.is_dir() {
            return bad(format!(
                "wwwroot '{}' is not a directory",
                args.wwwroot.display()
            ));
        }
        if args.limit == 0 {
            return bad("--limit must be at least 1".into());
        }
        if args.max_message_size < 64 {
            return bad("--max-message-size must be at least 64 bytes".into());
        }
        if args.channel_bytes < args.max_message_size {
            return bad("--channel-bytes must be at least --max-message-size".into());
        }
        if args.queue_frames == 0 || args.max_connections == 0 {
            return bad("--queue-frames and --max-connections must be at least 1".into());
        }
        for (name, v) in [
            ("--first-frame-timeout", args.first_frame_timeout),
            ("--handshake-timeout", args.handshake_timeout),
            ("--ping-interval", args.ping_interval),
            ("--write-timeout", args.write_timeout),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1 second"));
            }
        }
        if args.missed_pongs == 0 {
            return bad("--missed-pongs must be at least 1".into());
        }
        if let Some(cache) = &args.cache {
            if let Err(e) = std::fs::create_dir_all(cache) {
                return bad(format!("cannot create cache '{}': {e}", cache.display()));
            }
        }
        let peer_urls = args
            .peer
            .iter()
            .map(|u| parse_peer_url(u.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(ca) = &args.peer_ca {
            if let Err(e) = std::fs::metadata(ca) {
                return bad(format!("cannot read '{}': {e}", ca.display()));
            }
        }
        let nats = NatsConfig::from_args(&args)?;
        if nats.is_some() && !peer_urls.is_empty() {
            return bad("--peer and --nats do not go together: with --nats the servers of a cluster share channels through NATS; to link a server outside the cluster, give it --peer to one of them".into());
        }
        let peer_key = match peer_key {
            None if !peer_urls.is_empty() => {
                return bad("--peer needs MLES_PEER_KEY: the secret peer servers share (not MLES_KEY, which every client knows)".into());
            }
            None => None,
            Some(k) if k.len() < MIN_PEER_KEY_LEN => {
                return bad(format!(
                    "MLES_PEER_KEY must be at least {MIN_PEER_KEY_LEN} characters"
                ));
            }
            Some(k) if key.as_deref() == Some(k.as_str()) => {
                return bad(
                    "MLES_PEER_KEY must differ from MLES_KEY, which every client knows".into(),
                );
            }
            Some(k) => Some(protocol::PeerKey::new(&k)),
        };
        let server_id = args.server_id.clone().unwrap_or_else(host_name);
        let printable = server_id.bytes().all(|b| (0x21..0x7f).contains(&b));
        if server_id.is_empty() || server_id.len() > protocol::MAX_SERVER_ID || !printable {
            return bad(format!(
                "--server-id '{server_id}' must be 1-{} printable ASCII characters without spaces",
                protocol::MAX_SERVER_ID
            ));
        }
        let proxies = args
            .proxy
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(crate::proxy::ProxyRule::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Config)?;
        let max_memory = args.max_memory.unwrap_or_else(crate::budget::default_limit);
        if max_memory < MIN_MEMORY {
            return bad(format!(
                "--max-memory must be at least {}M",
                MIN_MEMORY >> 20
            ));
        }
        let ip = args.bind.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        Ok(Config {
            domains,
            email: args.email,
            cache: args.cache,
            wwwroot: args.wwwroot,
            listen: SocketAddr::new(ip, args.port),
            redirect: args
                .redirect
                .then(|| SocketAddr::new(ip, args.redirect_port)),
            tls,
            key,
            peer_key,
            max_memory,
            hub: HubConfig {
                history_limit: args.limit,
                queue_frames: args.queue_frames,
                channel_bytes: args.channel_bytes,
                history_expiry: Duration::from_secs(args.history_expiry),
                max_members: nonzero(args.channel_max_members),
                max_messages: nonzero(args.channel_max_messages),
                lifespan: nonzero(args.channel_lifespan).map(Duration::from_secs),
                max_channels: args.max_channels.max(1),
            },
            session: SessionConfig {
                max_message_size: args.max_message_size,
                first_frame_timeout: Duration::from_secs(args.first_frame_timeout),
                ping_interval: Duration::from_secs(args.ping_interval),
                missed_pongs: args.missed_pongs,
                write_timeout: Duration::from_secs(args.write_timeout),
                message_rate: nonzero(args.message_rate)
                    .map(|n| (n, Duration::from_secs(args.message_window.max(1)))),
                idle_timeout: nonzero(args.idle_timeout).map(Duration::from_secs),
                max_age: nonzero(args.max_connection_age).map(Duration::from_secs),
            },
            handshake_timeout: Duration::from_secs(args.handshake_timeout),
            max_connections: args.max_connections,
            ip_rate: nonzero(args.ip_rate),
            per_ip_limit: nonzero(args.per_ip_limit),
            // The cache is set aside from the memory budget: at most an eighth of it.
            static_cache_bytes: args
                .static_cache_mb
                .saturating_mul(1024 * 1024)
                .min(max_memory / 8),
            proxies,
            metrics_bind: args.metrics_bind,
            metrics_on_main: args.metrics_on_main,
            peers: PeerConfig {
                urls: peer_urls,
                ca: args.peer_ca,
                grace: Duration::from_secs(args.peer_grace),
            },
            server_id,
            peer_envelopes: !args.plain_peer_protocol,
            nats,
            log_format: args.log_format,
        })
    }

    /// A configuration for tests and embedding: plain WebSocket on an ephemeral loopback
    /// port, serving `wwwroot` for the loopback names.
    pub fn local(wwwroot: impl Into<PathBuf>) -> Config {
        let args = Args::parse_from(["mles", "--tls", "off", "--port", "0", "--bind", "127.0.0.1"]);
        let mut config = Config::from_args(
            Args {
                wwwroot: ".".into(),
                ..args
            },
            Secrets::default(),
        )
        .expect("local defaults are valid");
        config.wwwroot = wwwroot.into();
        config
    }
}

/// `None` for zero: the flags use 0 for "no limit".
fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

/// This machine's host name, the default server id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mles".to_string())
}

/// A DNS name as a Host header carries it: letters, digits, '-' and '.'.
fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !d.starts_with('.')
        && !d.contains("..")
}

/// Sizes of each channel's ring.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Frames replayed to a new member.
    pub history_limit: usize,
    /// Frames a member may fall behind before it is disconnected.
    pub queue_frames: usize,
    /// Bytes of frames a channel keeps, for history and for members catching up.
    pub channel_bytes: usize,
    /// How long a channel without members keeps its history after its last activity.
    pub history_expiry: Duration,
    /// Most clients in one channel.
    pub max_members: Option<usize>,
    /// Most frames clients may publish to one channel (join frames included).
    pub max_messages: Option<u64>,
    /// How long a channel lives from its creation.
    pub lifespan: Option<Duration>,
    /// Most channels held at once; past it the least recently active channel without
    /// members is dropped to make room, and if every channel has members new ones are
    /// refused.
    pub max_channels: usize,
}

impl HubConfig {
    /// The ring of a channel with members holds the history plus room for members to fall
    /// behind, so a new member whose whole history is still unsent has the same slack as
    /// everyone else.
    pub(crate) fn ring_frames(&self) -> usize {
        self.history_limit + self.queue_frames
    }

    /// Join frames a channel's history keeps at most: half of it.
    pub(crate) fn join_quota(&self) -> usize {
        (self.history_limit / 2).max(1)
    }

    /// Relayed keys remembered per channel for de-duplication.
    pub(crate) fn seen_capacity(&self) -> usize {
        (self.ring_frames() * 4).max(4096)
    }
}

/// Per-connection limits and timers.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub max_message_size: usize,
    pub first_frame_timeout: Duration,
    pub ping_interval: Duration,
    pub missed_pongs: u32,
    pub write_timeout: Duration,
    /// At most this many frames per window from a client.
    pub message_rate: Option<(u32, Duration)>,
    /// Close a client that sent nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Close a client connection this old.
    pub max_age: Option<Duration>,
}

/// Peer settings, validated.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub urls: Vec<Uri>,
    /// Extra CA certificates (PEM) to trust for `wss://` peers.
    pub ca: Option<std::path::PathBuf>,
    /// How long a link stays up after its channel's last local client left.
    pub grace: Duration,
}

/// Parses and checks a `ws://` or `wss://` peer URL.
pub fn parse_peer_url(url: &str) -> Result<Uri, Error> {
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("peer URL '{url}': {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("ws" | "wss"), Some(_)) => Ok(uri),
        _ => Err(Error::Config(format!(
            "peer URL '{url}' must be ws://host[:port]/ or wss://host[:port]/"
        ))),
    }
}

/// NATS settings, validated. (Its `Debug` leaves out URL credentials.)
#[derive(Clone)]
pub struct NatsConfig {
    pub urls: Vec<ServerAddr>,
    /// Credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// Extra CA certificate (PEM) for NATS servers with private certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for NATS servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Replicas of the stream.
    pub replicas: usize,
    /// How long a link stays up after its channel's last local client left.
    pub grace: Duration,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<String> = self
            .urls
            .iter()
            .map(|u| format!("{}:{}", u.host(), u.port()))
            .collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("creds", &self.creds)
            .field("ca", &self.ca)
            .field("replicas", &self.replicas)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl NatsConfig {
    /// Settings for the NATS servers at `urls` (comma separated), all else default.
    pub fn new(urls: &str) -> Result<NatsConfig, Error> {
        Ok(NatsConfig {
            urls: parse_urls(urls.split(','))?,
            creds: None,
            ca: None,
            client_cert: None,
            replicas: 1,
            grace: Duration::from_secs(30),
        })
    }

    /// The settings of `--nats` and friends; `None` without `--nats`.
    pub fn from_args(args: &Args) -> Result<Option<NatsConfig>, Error> {
        let urls = parse_urls(args.nats.iter().map(String::as_str))?;
        let extras = args.nats_creds.is_some()
            || args.nats_ca.is_some()
            || args.nats_client_cert.is_some()
            || args.nats_client_key.is_some();
        if urls.is_empty() {
            if extras {
                return Err(Error::Config(
                    "--nats-creds, --nats-ca and --nats-client-cert/key need --nats".into(),
                ));
            }
            return Ok(None);
        }
        for file in [
            &args.nats_creds,
            &args.nats_ca,
            &args.nats_client_cert,
            &args.nats_client_key,
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = std::fs::metadata(file) {
                return Err(Error::Config(format!(
                    "cannot read '{}': {e}",
                    file.display()
                )));
            }
        }
        let client_cert = match (&args.nats_client_cert, &args.nats_client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "--nats-client-cert and --nats-client-key go together".into(),
                ))
            }
        };
        if !(1..=5).contains(&args.nats_replicas) {
            return Err(Error::Config("--nats-replicas must be 1 to 5".into()));
        }
        Ok(Some(NatsConfig {
            urls,
            creds: args.nats_creds.clone(),
            ca: args.nats_ca.clone(),
            client_cert,
            replicas: args.nats_replicas,
            grace: Duration::from_secs(args.peer_grace),
        }))
    }
}

fn parse_urls<'a>(urls: impl Iterator<Item = &'a str>) -> Result<Vec<ServerAddr>, Error> {
    urls.map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| Error::Config(format!("NATS URL '{u}': {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, Error> {
        let mut argv = vec!["mles", "--wwwroot", "."];
        argv.extend_from_slice(extra);
        Config::from_args(
            Args::try_parse_from(argv).expect("flags parse"),
            Secrets::default(),
        )
    }

    #[test]
    fn domains_default_to_acme_and_no_domains_to_self_signed() {
        let c = parse(&["-d", "example.org"]).unwrap();
        assert!(matches!(c.tls, TlsConfig::Acme { .. }));
        let c = parse(&[]).unwrap();
        assert!(matches!(c.tls, TlsConfig::SelfSigned));
        assert_eq!(c.domains, vec!["localhost", "127.0.0.1", "::1"]);
    }

    #[test]
    fn bad_values_are_refused_with_a_message() {
        let msg = |r: Result<Config, Error>| r.unwrap_err().to_string();
        assert!(msg(parse(&["--limit", "0"])).contains("--limit"));
        assert!(msg(parse(&["--tls", "acme"])).contains("--domains"));
        assert!(msg(parse(&["--cert", "/nonexistent.pem", "--key", "/x"])).contains("cannot read"));
        assert!(msg(parse(&["-d", "bad/host"])).contains("invalid domain"));
        let c = Config::from_args(
            Args::try_parse_from(["mles", "--wwwroot", "/nonexistent-dir"]).unwrap(),
            Secrets::default(),
        );
        assert!(msg(c).contains("not a directory"));
        assert!(Args::try_parse_from(["mles", "--tls", "bogus"]).is_err());
    }

    #[test]
    fn key_is_never_in_debug_output() {
        let c = Config::from_args(
            Args::try_parse_from(["mles", "--wwwroot", "."]).unwrap(),
            Secrets {
                key: Some("hunter2".into()),
                peer_key: Some("correct horse battery".into()),
            },
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("horse"),
            "{debug}"
        );
    }

    #[test]
    fn peering_needs_a_peer_key_of_its_own() {
        let with = |key: Option<&str>, peer_key: Option<&str>, extra: &[&str]| {
            let mut argv = vec!["mles", "--wwwroot", "."];
            argv.extend_from_slice(extra);
            let secrets = Secrets {
                key: key.map(Into::into),
                peer_key: peer_key.map(Into::into),
            };
            Config::from_args(Args::try_parse_from(argv).unwrap(), secrets)
        };
        let peer = ["--peer", "ws://127.0.0.1:9/"];
        let err = |r: Result<Config, Error>| r.unwrap_err().to_string();
        assert!(err(with(Some("k"), None, &peer)).contains("MLES_PEER_KEY"));
        assert!(err(with(None, Some("short"), &peer)).contains("at least 16"));
        let same = "the same long secret";
        assert!(err(with(Some(same), Some(same), &peer)).contains("differ from MLES_KEY"));
        let c = with(Some("k"), Some("a long peer secret"), &peer).unwrap();
        assert!(c.peer_key.is_some() && c.peers.urls.len() == 1);
        // Without --peer a peer key still lets peers link to this server.
        assert!(with(None, Some("a long peer secret"), &[])
            .unwrap()
            .peer_key
            .is_some());
    }
    #[test]
    fn flags_are_validated() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["mles", "--wwwroot", "."];
            argv.extend_from_slice(extra);
            Config::from_args(Args::try_parse_from(argv).unwrap(), Secrets::default())
        };
        let c = parse(&[
            "--nats",
            "nats://127.0.0.1:4222,127.0.0.1:4223",
            "--limit",
            "7",
        ])
        .unwrap();
        let nats = c.nats.expect("nats configured");
        assert_eq!(nats.urls.len(), 2);
        assert_eq!(nats.replicas, 1);
        assert!(parse(&[]).unwrap().nats.is_none());
        let err = |r: Result<Config, Error>| r.unwrap_err().to_string();
        assert!(
            err(parse(&["--nats", "n:1", "--peer", "ws://127.0.0.1:1/"]))
                .contains("--peer and --nats")
        );
        assert!(err(parse(&["--nats-ca", "Cargo.toml"])).contains("need --nats"));
        assert!(
            err(parse(&["--nats", "n:1", "--nats-creds", "/nonexistent"])).contains("cannot read")
        );
        assert!(err(parse(&[
            "--nats",
            "n:1",
            "--nats-client-cert",
            "Cargo.toml"
        ]))
        .contains("go together"));
        assert!(err(parse(&["--nats", "http://x"])).contains("NATS URL"));
        let debug = format!(
            "{:?}",
            NatsConfig::new("nats://me:secret@127.0.0.1:4222").unwrap()
        );
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn urls_are_checked() {
        assert!(NatsConfig::new("nats://127.0.0.1:4222").is_ok());
        assert_eq!(
            NatsConfig::new("127.0.0.1:1,tls://h:2").unwrap().urls.len(),
            2
        );
        assert!(NatsConfig::new("http://x").is_err());
    }

    #[test]
    fn peer_urls_must_be_websocket_urls() {
        assert!(parse_peer_url("ws://127.0.0.1:8080/").is_ok());
        assert!(parse_peer_url("wss://example.org").is_ok());
        assert!(parse_peer_url("http://example.org").is_err());
        assert!(parse_peer_url("example.org").is_err());
    }
}
