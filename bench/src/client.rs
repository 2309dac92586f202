//! A lean WebSocket client for load generation.
//!
//! The load generator shares two cores with the server under test, so its clients must cost
//! far less per frame than the server does. This client reads into one buffer per
//! connection and parses frames in place (no allocation or copy per frame), writes
//! publisher frames in batches with one syscall, and speaks only what the bench needs: the
//! upgrade with the `mles-websocket` subprotocol, masked client frames, unmasked server
//! frames, pong replies and close.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// The upgrade request; the key is fixed (the bench does not check the accept header).
const UPGRADE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mles-websocket\r\n\r\n";

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Where clients connect, and whether over TLS.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<TlsConnector>,
}

/// How one client's socket is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOpts {
    /// Local address to bind before connecting (127.0.0.x spreads clients over more ports
    /// than one address has).
    pub source: Option<IpAddr>,
    /// SO_RCVBUF, for a client that stops reading and should fill its buffers soon.
    pub recv_buffer: Option<u32>,
}

/// A TCP connection to `addr` set up as `opts` says, with TCP_NODELAY.
pub async fn tcp_connect(addr: SocketAddr, opts: SocketOpts) -> io::Result<TcpStream> {
    let tcp = if opts.source.is_none() && opts.recv_buffer.is_none() {
        TcpStream::connect(addr).await?
    } else {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(size) = opts.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(ip) = opts.source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await?
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

impl Target {
    async fn open(&self, opts: SocketOpts) -> io::Result<BoxIo> {
        let tcp = tcp_connect(self.addr, opts).await?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(connector) => {
                let name = ServerName::try_from("localhost").expect("valid name");
                Ok(Box::new(connector.connect(name, tcp).await?))
            }
        }
    }
}

/// Accepts any server certificate (the servers under test use fresh self-signed ones) but
/// still checks the handshake signatures, so the TLS work is the real work. Bench only.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client for self-signed loopback servers (rustls's default session cache: it
/// resumes when the server lets it).
pub fn tls_connector() -> TlsConnector {
    TlsConnector::from(tls_config(true))
}

/// The client configuration: certificates unchecked, handshake signatures checked; with
/// `resumption`, rustls's in-memory session cache, otherwise every handshake is full.
pub fn tls_config(resumption: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// Appends one masked client frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One joined client connection with its read buffer.
pub struct Conn {
    io: BoxIo,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pub mask: [u8; 4],
    /// Bytes read from the socket so far, the upgrade response included (what the server
    /// sent that reached this client, less what was still unread when it left).
    pub bytes_read: u64,
}

impl Conn {
    /// Connects, upgrades with the Mles subprotocol and sends the join frame.
    /// `buf_size` is the initial read buffer; it grows only for a frame larger than it.
    pub async fn connect(
        target: &Target,
        uid: &str,
        channel: &str,
        buf_size: usize,
    ) -> io::Result<Conn> {
        Conn::connect_with(target, SocketOpts::default(), uid, channel, buf_size).await
    }

    /// [`Conn::connect`] with socket options.
    pub async fn connect_with(
        target: &Target,
        opts: SocketOpts,
        uid: &str,
        channel: &str,
        buf_size: usize,
    ) -> io::Result<Conn> {
        let join = format!(r#"{{"uid":"{uid}","channel":"{channel}"}}"#);
        Conn::connect_join(target, opts, uid, &join, buf_size).await
    }

    /// [`Conn::connect_with`] with a join frame of the caller's (extra fields such as the
    /// resume extension's `positions` and `since`); `uid` only picks the mask.
    pub async fn connect_join(
        target: &Target,
        opts: SocketOpts,
        uid: &str,
        join: &str,
        buf_size: usize,
    ) -> io::Result<Conn> {
        let mut conn = Conn::connect_raw_with(target, opts).await?;
        let mut out = Vec::with_capacity(join.len() + 16);
        conn.mask = mask_for(uid);
        encode_frame(&mut out, OP_TEXT, join.as_bytes(), conn.mask);
        conn.send(&out).await?;
        if buf_size > conn.buf.len() {
            conn.buf.resize(buf_size, 0);
        }
        Ok(conn)
    }

    /// Connects and upgrades, without a join frame (for clients that misbehave).
    pub async fn connect_raw(target: &Target) -> io::Result<Conn> {
        Conn::connect_raw_with(target, SocketOpts::default()).await
    }

    async fn connect_raw_with(target: &Target, opts: SocketOpts) -> io::Result<Conn> {
        let mut io = target.open(opts).await?;
        io.write_all(UPGRADE_REQUEST).await?;
        io.flush().await?;
        let mut conn = Conn {
            io,
            buf: vec![0; 1024],
            start: 0,
            end: 0,
            mask: [0x5a, 0x3c, 0x96, 0x71],
            bytes_read: 0,
        };
        loop {
            if let Some(pos) = find(&conn.buf[..conn.end], b"\r\n\r\n") {
                if !conn.buf.starts_with(b"HTTP/1.1 101") {
                    let line = conn.buf[..pos].split(|&b| b == b'\r').next().unwrap_or(&[]);
                    return Err(invalid(format!(
                        "upgrade refused: {}",
                        String::from_utf8_lossy(line)
                    )));
                }
                conn.start = pos + 4;
                break;
            }
            if conn.end == conn.buf.len() {
                return Err(invalid("upgrade response too long"));
            }
            let n = conn.io.read(&mut conn.buf[conn.end..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            conn.end += n;
            conn.bytes_read += n as u64;
        }
        Ok(conn)
    }

    /// Writes already encoded frames.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.buf.len() / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        self.bytes_read += n as u64;
        Ok(n)
    }

    /// The next complete frame in the buffer: its opcode and payload's range in
    /// [`Conn::buf`]. Fragmented messages are not reassembled (servers here send whole
    /// frames); a continuation would show up as opcode 0 and fail the payload check.
    pub fn next_frame(&mut self) -> io::Result<Option<(u8, Range<usize>)>> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(None);
        }
        if avail[1] & 0x80 != 0 {
            return Err(invalid("masked frame from server"));
        }
        let (len, header) = match avail[1] & 0x7f {
            126 if avail.len() >= 4 => (u16::from_be_bytes([avail[2], avail[3]]) as usize, 4),
            127 if avail.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        let total = header + len;
        if avail.len() < total {
            if total > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.buf.resize(total.next_power_of_two(), 0);
            }
            return Ok(None);
        }
        let opcode = avail[0] & 0x0f;
        let range = self.start + header..self.start + total;
        self.start += total;
        Ok(Some((opcode, range)))
    }

    pub fn payload(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// The byte stream, for a publisher that writes and drains concurrently. Bytes already
    /// buffered are dropped (a publisher ignores what it receives).
    pub fn into_io(self) -> BoxIo {
        self.io
    }
}

/// The status code of a close frame's payload (1005, "no status", when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 1005,
    }
}

fn mask_for(uid: &str) -> [u8; 4] {
    let h = uid.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    (h | 0x0101_0101).to_le_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One TLS connection as a browser makes it: TCP connect from `opts`, TLS handshake with
/// `config` under `name`, and the WebSocket upgrade (whose response also carries the
/// server's session tickets to the client). Returns whether the handshake was a resumed one.
pub async fn tls_upgrade(
    addr: SocketAddr,
    opts: SocketOpts,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<bool> {
    let tcp = tcp_connect(addr, opts).await?;
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    tls.write_all(UPGRADE_REQUEST).await?;
    tls.flush().await?;
    let mut buf = vec![0u8; 1024];
    let mut end = 0;
    loop {
        if let Some(pos) = find(&buf[..end], b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let line = buf[..pos].split(|&b| b == b'\r').next().unwrap_or(&[]);
                return Err(invalid(format!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(line)
                )));
            }
            break;
        }
        if end == buf.len() {
            return Err(invalid("upgrade response too long"));
        }
        let n = tls.read(&mut buf[end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        end += n;
    }
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // Close as a client does: close_notify, then the TCP close.
    let _ = tls.shutdown().await;
    Ok(resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser_once_unmasked() {
        let mut out = Vec::new();
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        encode_frame(&mut out, OP_BINARY, &payload, [1, 2, 3, 4]);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 126);
        let masked = &out[8..];
        let unmasked: Vec<u8> = masked
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i & 3])
            .collect();
        assert_eq!(unmasked, payload);
    }
}
