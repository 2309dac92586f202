//! The Mles v2 wire protocol without I/O: the `mles-websocket` subprotocol name, the join
//! (first) frame and its validation, the SipHash auth token, the close codes the server
//! sends, and the envelope that links between two servers of this kind carry each frame
//! in. Pure functions, unit-tested here.

use siphasher::sip::SipHasher;
use std::hash::Hasher;
use subtle::ConstantTimeEq;

/// The WebSocket subprotocol a client must offer.
pub const SUBPROTOCOL: &str = "mles-websocket";

/// Longest uid or channel name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Longest join frame accepted, in bytes; the fields are short, so this is generous.
pub const MAX_JOIN_FRAME: usize = 4096;

/// WebSocket close codes used by the server (RFC 6455 §7.4.1).
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A rule was broken: bad join frame, auth failure, duplicate uid, rate limit.
    pub const POLICY: u16 = 1008;
    /// A message was larger than the server accepts.
    pub const TOO_BIG: u16 = 1009;
    /// The server cannot keep this connection: it fell too far behind its channel.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// A validated join request: who joins which channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub uid: String,
    pub channel: String,
    pub auth: Option<String>,
    /// `"presence": true`: the client wants join and leave notices.
    pub presence: bool,
    /// `"positions": true`: the client wants position marks (see [`Position`]).
    pub positions: bool,
    /// `"since"`: the position the client saw last, to resume from. Any value that is not
    /// a string is kept as an empty token, which names no position: a bad token never
    /// refuses a join, it only means the client gets the history as usual.
    pub since: Option<String>,
    /// `peer_proof`: a linking server's proof of the peer key (see [`PeerKey`]).
    pub peer_proof: Option<String>,
    /// The join frame as it goes into history: the client's frame minus its `auth` and
    /// `peer_proof` fields.
    pub history_frame: String,
}

/// Why a join frame was refused; the `Display` text is the close reason sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("join frame must be a text frame")]
    NotText,
    #[error("join frame too long")]
    TooLong,
    #[error("join frame is not a JSON object")]
    NotJson,
    #[error("join frame field '{0}' missing")]
    Missing(&'static str),
    #[error("join frame field '{0}' has the wrong type")]
    WrongType(&'static str),
    #[error("join frame field '{0}' must be 1-256 printable ASCII characters")]
    BadName(&'static str),
    #[error("authentication failed")]
    AuthFailed,
}

/// Parses and validates a join frame's text. Unknown fields are kept (and replayed in
/// history) so clients may carry their own metadata, as with mles v2.
pub fn parse_join(text: &str) -> Result<Join, JoinError> {
    if text.len() > MAX_JOIN_FRAME {
        return Err(JoinError::TooLong);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|_| JoinError::NotJson)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(JoinError::NotJson);
    };
    let uid = name_field(&object, "uid")?;
    let channel = name_field(&object, "channel")?;
    let presence = bool_field(&object, "presence")?;
    let positions = bool_field(&object, "positions")?;
    let since = match object.get("since") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => Some(String::new()),
    };
    let auth = string_field(&object, "auth")?;
    let peer_proof = string_field(&object, "peer_proof")?;
    // Keep the client's bytes when there is nothing to strip, so history is what was sent.
    // A resume token is this client's business, not history's.
    let stripped = object.remove("auth").is_some()
        | object.remove("peer_proof").is_some()
        | object.remove("since").is_some();
    let history_frame = if stripped {
        serde_json::Value::Object(object).to_string()
    } else {
        text.to_string()
    };
    Ok(Join {
        uid,
        channel,
        auth,
        presence,
        positions,
        since,
        peer_proof,
        history_frame,
    })
}

/// An optional boolean field (absent or null: false).
fn bool_field(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<bool, JoinError> {
    match object.get(field) {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(_) => Err(JoinError::WrongType(field)),
    }
}

/// An optional string field (absent or null: `None`).
fn string_field(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Option<String>, JoinError> {
    match object.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JoinError::WrongType(field)),
    }
}

fn name_field(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<String, JoinError> {
    match object.get(field) {
        None => Err(JoinError::Missing(field)),
        Some(serde_json::Value::String(s)) => {
            let printable = s.bytes().all(|b| (0x20..0x7f).contains(&b));
            if s.is_empty() || s.len() > MAX_NAME_LEN || !printable {
                Err(JoinError::BadName(field))
            } else {
                Ok(s.clone())
            }
        }
        Some(_) => Err(JoinError::WrongType(field)),
    }
}

/// The mles v2 auth token: SipHash-2-4 with key (0, 0) over uid, channel and then the
/// shared key (when there is one), as lowercase hex.
pub fn auth_token(uid: &str, channel: &str, key: Option<&str>) -> String {
    let mut hasher = SipHasher::new();
    hasher.write(uid.as_bytes());
    hasher.write(channel.as_bytes());
    if let Some(key) = key {
        hasher.write(key.as_bytes());
    }
    format!("{:x}", hasher.finish())
}

/// Checks a join's auth against the server key, as mles v2 does: with a key the token is
/// required; without one a token that is present must still match uid + channel.
pub fn verify_auth(join: &Join, key: Option<&str>) -> Result<(), JoinError> {
    let presented = match (&join.auth, key) {
        (None, None) => return Ok(()),
        (None, Some(_)) => return Err(JoinError::AuthFailed),
        (Some(a), _) => a,
    };
    let expected = auth_token(&join.uid, &join.channel, key);
    // Accept what u64::from_str_radix accepts in v2 (any case, leading zeros) by
    // normalising first; the comparison itself is constant-time.
    let normalised = u64::from_str_radix(presented, 16)
        .map(|v| format!("{v:x}"))
        .unwrap_or_default();
    if normalised.as_bytes().ct_eq(expected.as_bytes()).into() {
        Ok(())
    } else {
        Err(JoinError::AuthFailed)
    }
}

/// Where a client is in a channel: after which frame its next frame comes. Carried to the
/// client as an opaque token (`{"position":"<token>"}`) and back in a join frame's `since`
/// to resume (see the README's protocol section).
///
/// A position is a number in a numbering the channel keeps for as long as its `epoch`
/// lasts: this server's numbering of the channel (`stream` false; it survives a graceful
/// restart with `--cache`), or the NATS stream's (`stream` true: the same on every server
/// of a cluster). The token carries the epoch, so a token from before a restart that lost
/// the history, from another server or another stream is never misread; it is bound to the
/// channel (a hash of its name), and checksummed so a damaged token is refused. A token is
/// no secret and grants nothing: it only names a place in a channel the client joins
/// with its own credentials, within the history a new member would be replayed anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub stream: bool,
    pub epoch: u64,
    /// The number of the next frame the client has not seen.
    pub next: u64,
}

/// Longest resume token accepted.
pub const MAX_TOKEN_LEN: usize = 64;

const TOKEN_VERSION: u8 = 1;

/// A 32-bit tag of `data` (SipHash-2-4, key 0): binds a token to its channel and checks it.
fn tag32(parts: &[&[u8]]) -> u32 {
    let mut hasher = SipHasher::new();
    for part in parts {
        hasher.write(part);
    }
    hasher.finish() as u32
}

impl Position {
    /// The token of this position in `channel`.
    pub fn token(&self, channel: &str) -> String {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(25);
        bytes.push(TOKEN_VERSION | if self.stream { 0x80 } else { 0 });
        bytes.extend_from_slice(&self.epoch.to_be_bytes());
        bytes.extend_from_slice(&self.next.to_be_bytes());
        bytes.extend_from_slice(&tag32(&[channel.as_bytes()]).to_be_bytes());
        let check = tag32(&[&bytes]);
        bytes.extend_from_slice(&check.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position `token` names in `channel`; `None` when it is malformed, damaged, too
    /// long, or from another channel.
    pub fn from_token(token: &str, channel: &str) -> Option<Position> {
        use base64::Engine;
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        if bytes.len() != 25 || bytes[0] & 0x7f != TOKEN_VERSION {
            return None;
        }
        let check = u32::from_be_bytes(bytes[21..25].try_into().ok()?);
        if check != tag32(&[&bytes[..21]]) {
            return None;
        }
        let tag = u32::from_be_bytes(bytes[17..21].try_into().ok()?);
        if tag != tag32(&[channel.as_bytes()]) {
            return None;
        }
        Some(Position {
            stream: bytes[0] & 0x80 != 0,
            epoch: u64::from_be_bytes(bytes[1..9].try_into().ok()?),
            next: u64::from_be_bytes(bytes[9..17].try_into().ok()?),
        })
    }
}

/// The position mark sent to a client that asked for them.
pub fn position_mark(position: &Position, channel: &str) -> String {
    format!(r#"{{"position":"{}"}}"#, position.token(channel))
}

/// The first frame to a client that asked to resume.
pub fn recovered_frame(recovered: bool) -> &'static str {
    if recovered {
        r#"{"recovered":true}"#
    } else {
        r#"{"recovered":false}"#
    }
}

/// Request header a server sends when it opens a peer link, and the response header a
/// server of this kind answers with when it holds a peer key: both then prove that key
/// ([`PeerKey`]) and wrap every frame in an [`Envelope`]. A plain mles v2 server, or one
/// without a peer key, ignores the header and the link carries bare frames.
pub const PEER_HEADER: &str = "x-mles-peer";

/// Version of the peer handshake and envelope format carried in [`PEER_HEADER`].
pub const PEER_VERSION: &str = "2";

/// Request header: the linking server's fresh nonce (hex).
pub const PEER_NONCE_HEADER: &str = "x-mles-peer-nonce";

/// Response header: the accepting server's fresh nonce (hex), which the link's proof covers.
pub const PEER_CHALLENGE_HEADER: &str = "x-mles-peer-challenge";

/// Response header: the accepting server's proof that it holds the peer key.
pub const PEER_PROOF_HEADER: &str = "x-mles-peer-proof";

/// Bytes of each handshake nonce.
pub const PEER_NONCE_LEN: usize = 16;

/// The secret peer servers share (`MLES_PEER_KEY`), distinct from the client key: clients
/// know `MLES_KEY` (they compute their auth tokens with it), so only this one proves that a
/// connection comes from a server. Never printed.
///
/// The handshake: the link sends a fresh nonce in [`PEER_NONCE_HEADER`]; the accepting
/// server answers the upgrade with a fresh nonce of its own in [`PEER_CHALLENGE_HEADER`]
/// and its proof over both nonces in [`PEER_PROOF_HEADER`]; the link checks that proof and
/// sends its own, over both nonces, its uid and the channel, as `peer_proof` in its join
/// frame. Each proof is an HMAC-SHA256 under the key, compared in constant time. Since
/// each side's proof covers the other side's fresh nonce, a recorded proof is worthless on
/// any other connection.
#[derive(Clone)]
pub struct PeerKey(Vec<u8>);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

/// Which side of a peer handshake a proof is from; part of what the MAC covers, so one
/// side's proof never passes as the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// The server that opens the link.
    Link,
    /// The server that accepts it.
    Server,
}

impl PeerKey {
    pub fn new(secret: &str) -> PeerKey {
        PeerKey(secret.as_bytes().to_vec())
    }

    fn mac(
        &self,
        role: PeerRole,
        link_nonce: &str,
        server_nonce: &str,
        names: &[&str],
    ) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        let label: &[u8] = match role {
            PeerRole::Link => b"mles-peer-v2 link",
            PeerRole::Server => b"mles-peer-v2 server",
        };
        // Every field is NUL-terminated: none of them may contain NUL (nonces are hex,
        // names printable ASCII), so the encoding is unambiguous.
        for field in [label, link_nonce.as_bytes(), server_nonce.as_bytes()]
            .into_iter()
            .chain(names.iter().map(|n| n.as_bytes()))
        {
            mac.update(field);
            mac.update(&[0]);
        }
        mac
    }

    /// The proof `role` sends, as lowercase hex. `names` are the link's uid and channel for
    /// the link's proof, nothing for the server's.
    pub fn prove(
        &self,
        role: PeerRole,
        link_nonce: &str,
        server_nonce: &str,
        names: &[&str],
    ) -> String {
        use hmac::Mac;
        hex::encode(
            self.mac(role, link_nonce, server_nonce, names)
                .finalize()
                .into_bytes(),
        )
    }

    /// Whether `proof` (hex) is `role`'s proof for these nonces and names; constant time.
    pub fn verify(
        &self,
        role: PeerRole,
        link_nonce: &str,
        server_nonce: &str,
        names: &[&str],
        proof: &str,
    ) -> bool {
        use hmac::Mac;
        let Ok(bytes) = hex::decode(proof) else {
            return false;
        };
        self.mac(role, link_nonce, server_nonce, names)
            .verify_slice(&bytes)
            .is_ok()
    }
}

/// A fresh random nonce for a peer handshake, as hex.
pub fn peer_nonce() -> String {
    let mut bytes = [0u8; PEER_NONCE_LEN];
    // The OS generator failing is not something a server can recover from.
    getrandom::getrandom(&mut bytes).expect("the OS random number generator works");
    hex::encode(bytes)
}

/// Whether `nonce` is what [`peer_nonce`] makes: exactly that many lowercase hex digits.
pub fn valid_peer_nonce(nonce: &str) -> bool {
    nonce.len() == 2 * PEER_NONCE_LEN
        && nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

const ENVELOPE_MAGIC: &[u8; 4] = b"MLP1";

/// Longest origin an envelope carries (a server id of at most [`MAX_SERVER_ID`] characters,
/// `#` and its boot epoch always fit).
pub const MAX_ORIGIN: usize = 255;

/// Longest `--server-id`.
pub const MAX_SERVER_ID: usize = 200;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeKind {
    Text = 0,
    Binary = 1,
    /// A join frame: history only, never delivered live.
    Join = 2,
}

/// One frame on a link between servers: its identity (origin server and number), whether
/// it is live or history-only, and its payload. Encoded as a binary WebSocket frame:
/// `"MLP1" kind:u8 origin_len:u8 origin seq:u64be payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub kind: EnvelopeKind,
    pub origin: &'a str,
    pub seq: u64,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed peer envelope")]
pub struct BadEnvelope;

impl Envelope<'_> {
    /// The envelope's bytes before its payload: a link writes them, then the payload as it
    /// is stored, without copying it.
    pub fn prefix(&self) -> Vec<u8> {
        let origin = &self.origin.as_bytes()[..self.origin.len().min(MAX_ORIGIN)];
        let mut out = Vec::with_capacity(4 + 2 + origin.len() + 8);
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.push(self.kind as u8);
        out.push(origin.len() as u8);
        out.extend_from_slice(origin);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.prefix();
        out.extend_from_slice(self.payload);
        out
    }

    pub fn decode(data: &[u8]) -> Result<Envelope<'_>, BadEnvelope> {
        let rest = data.strip_prefix(ENVELOPE_MAGIC).ok_or(BadEnvelope)?;
        let (&kind, rest) = rest.split_first().ok_or(BadEnvelope)?;
        let kind = match kind {
            0 => EnvelopeKind::Text,
            1 => EnvelopeKind::Binary,
            2 => EnvelopeKind::Join,
            _ => return Err(BadEnvelope),
        };
        let (&len, rest) = rest.split_first().ok_or(BadEnvelope)?;
        let len = len as usize;
        if rest.len() < len + 8 || len == 0 {
            return Err(BadEnvelope);
        }
        let origin = std::str::from_utf8(&rest[..len]).map_err(|_| BadEnvelope)?;
        let seq = u64::from_be_bytes(rest[len..len + 8].try_into().expect("8 bytes"));
        let payload = &rest[len + 8..];
        if kind != EnvelopeKind::Binary && std::str::from_utf8(payload).is_err() {
            return Err(BadEnvelope);
        }
        Ok(Envelope {
            kind,
            origin,
            seq,
            payload,
        })
    }
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_garbage_is_refused() {
        let e = Envelope {
            kind: EnvelopeKind::Text,
            origin: "alpha#1f",
            seq: 42,
            payload: "héllo".as_bytes(),
        };
        let bytes = e.encode();
        assert_eq!(Envelope::decode(&bytes), Ok(e));
        let join = Envelope {
            kind: EnvelopeKind::Join,
            origin: "b",
            seq: 0,
            payload: b"",
        };
        assert_eq!(Envelope::decode(&join.encode()), Ok(join));
        assert_eq!(Envelope::decode(b"MLP1"), Err(BadEnvelope));
        assert_eq!(
            Envelope::decode(b"hello world, not an envelope"),
            Err(BadEnvelope)
        );
        let mut bad_text = Envelope {
            kind: EnvelopeKind::Text,
            origin: "a",
            seq: 1,
            payload: &[0xff],
        }
        .encode();
        assert_eq!(Envelope::decode(&bad_text), Err(BadEnvelope));
        bad_text[4] = 9;
        assert_eq!(Envelope::decode(&bad_text), Err(BadEnvelope));
    }

    #[test]
    fn peer_proofs_bind_key_role_nonces_and_names() {
        let key = PeerKey::new("peer secret");
        let (n1, n2) = (peer_nonce(), peer_nonce());
        assert!(valid_peer_nonce(&n1) && n1 != n2);
        let proof = key.prove(PeerRole::Link, &n1, &n2, &["a", "ch"]);
        assert!(key.verify(PeerRole::Link, &n1, &n2, &["a", "ch"], &proof));
        // Anything else changed and the proof fails.
        assert!(!PeerKey::new("client key").verify(PeerRole::Link, &n1, &n2, &["a", "ch"], &proof));
        assert!(!key.verify(PeerRole::Server, &n1, &n2, &["a", "ch"], &proof));
        assert!(!key.verify(PeerRole::Link, &n2, &n1, &["a", "ch"], &proof));
        assert!(!key.verify(PeerRole::Link, &n1, &peer_nonce(), &["a", "ch"], &proof));
        assert!(!key.verify(PeerRole::Link, &n1, &n2, &["a", "ch2"], &proof));
        assert!(!key.verify(PeerRole::Link, &n1, &n2, &["ach", ""], &proof));
        assert!(!key.verify(PeerRole::Link, &n1, &n2, &["a", "ch"], "zz"));
        assert!(!key.verify(PeerRole::Link, &n1, &n2, &["a", "ch"], &proof[..32]));
        assert!(!format!("{key:?}").contains("secret"));
        assert!(!valid_peer_nonce("00") && !valid_peer_nonce(&"G".repeat(32)));
    }

    #[test]
    fn a_peer_proof_in_a_join_frame_stays_out_of_history() {
        let j = parse_join(r#"{"uid":"a","channel":"c","peer_proof":"ab"}"#).unwrap();
        assert_eq!(j.peer_proof.as_deref(), Some("ab"));
        assert_eq!(j.history_frame, r#"{"uid":"a","channel":"c"}"#);
    }

    #[test]
    fn position_tokens_round_trip_and_bind_their_channel() {
        let p = Position {
            stream: true,
            epoch: 0x1234,
            next: 99,
        };
        let token = p.token("general");
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert_eq!(Position::from_token(&token, "general"), Some(p));
        assert_eq!(
            Position::from_token(&token, "other"),
            None,
            "another channel"
        );
        let mut damaged = token.clone().into_bytes();
        damaged[10] = if damaged[10] == b'A' { b'B' } else { b'A' };
        let damaged = String::from_utf8(damaged).unwrap();
        assert_eq!(Position::from_token(&damaged, "general"), None);
        assert_eq!(Position::from_token("garbage!", "general"), None);
        assert_eq!(Position::from_token(&"A".repeat(200), "general"), None);
        assert_eq!(Position::from_token("", "general"), None);
    }

    #[test]
    fn resume_fields_parse_and_the_token_stays_out_of_history() {
        let j = parse_join(r#"{"uid":"a","channel":"c","positions":true,"since":"tok"}"#).unwrap();
        assert!(j.positions);
        assert_eq!(j.since.as_deref(), Some("tok"));
        assert_eq!(
            j.history_frame,
            r#"{"uid":"a","channel":"c","positions":true}"#
        );
        let j = parse_join(r#"{"uid":"a","channel":"c","since":5}"#).unwrap();
        assert_eq!(j.since.as_deref(), Some(""), "a bad token is no refusal");
        assert!(parse_join(r#"{"uid":"a","channel":"c","positions":"yes"}"#).is_err());
    }

    #[test]
    fn parses_a_minimal_join() {
        let j = parse_join(r#"{"uid":"alice","channel":"general"}"#).unwrap();
        assert_eq!(j.uid, "alice");
        assert_eq!(j.channel, "general");
        assert_eq!(j.auth, None);
        assert_eq!(j.history_frame, r#"{"uid":"alice","channel":"general"}"#);
    }

    #[test]
    fn history_frame_drops_auth_and_keeps_other_fields_in_order() {
        let j = parse_join(r#"{"uid":"a","channel":"c","auth":"1f","nick":"A"}"#).unwrap();
        assert_eq!(j.auth.as_deref(), Some("1f"));
        assert_eq!(j.history_frame, r#"{"uid":"a","channel":"c","nick":"A"}"#);
    }

    #[test]
    fn refuses_malformed_frames_with_a_reason() {
        let cases: &[(&str, JoinError)] = &[
            ("hello", JoinError::NotJson),
            ("[1,2]", JoinError::NotJson),
            (r#"{"channel":"c"}"#, JoinError::Missing("uid")),
            (r#"{"uid":"u"}"#, JoinError::Missing("channel")),
            (r#"{"uid":5,"channel":"c"}"#, JoinError::WrongType("uid")),
            (
                r#"{"uid":"u","channel":"c","auth":7}"#,
                JoinError::WrongType("auth"),
            ),
            (r#"{"uid":"","channel":"c"}"#, JoinError::BadName("uid")),
            (
                r#"{"uid":"u","channel":"é"}"#,
                JoinError::BadName("channel"),
            ),
            (
                r#"{"uid":"u","channel":"a\nb"}"#,
                JoinError::BadName("channel"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_join(text).unwrap_err(), *want, "input {text}");
        }
        let long = format!(r#"{{"uid":"{}","channel":"c"}}"#, "x".repeat(257));
        assert_eq!(parse_join(&long).unwrap_err(), JoinError::BadName("uid"));
        let huge = format!(
            r#"{{"uid":"u","channel":"c","pad":"{}"}}"#,
            "x".repeat(5000)
        );
        assert_eq!(parse_join(&huge).unwrap_err(), JoinError::TooLong);
    }

    #[test]
    fn close_reasons_fit_in_a_close_frame() {
        // A close frame's reason is at most 123 bytes.
        for e in [
            JoinError::BadName("channel"),
            JoinError::WrongType("channel"),
            JoinError::AuthFailed,
        ] {
            assert!(e.to_string().len() <= 123);
        }
    }

    #[test]
    fn auth_token_matches_an_independent_siphash() {
        // SipHash-2-4, key 0: the reference vector for the empty message is 0x1e924b9d737700d7.
        assert_eq!(auth_token("", "", None), "1e924b9d737700d7");
        let mut h = SipHasher::new();
        h.write(b"alice");
        h.write(b"general");
        h.write(b"secret");
        assert_eq!(
            auth_token("alice", "general", Some("secret")),
            format!("{:x}", h.finish())
        );
    }

    #[test]
    fn auth_rules_follow_mles_v2() {
        let join = |auth: Option<String>| Join {
            uid: "u".into(),
            channel: "c".into(),
            auth,
            presence: false,
            positions: false,
            since: None,
            peer_proof: None,
            history_frame: String::new(),
        };
        let keyed = auth_token("u", "c", Some("k"));
        let unkeyed = auth_token("u", "c", None);
        assert!(verify_auth(&join(None), None).is_ok());
        assert!(verify_auth(&join(Some(unkeyed.clone())), None).is_ok());
        assert!(verify_auth(&join(Some("beef".into())), None).is_err());
        assert!(verify_auth(&join(None), Some("k")).is_err());
        assert!(verify_auth(&join(Some(unkeyed)), Some("k")).is_err());
        assert!(verify_auth(&join(Some(keyed.clone())), Some("k")).is_ok());
        assert!(verify_auth(&join(Some(keyed.to_uppercase())), Some("k")).is_ok());
        assert!(verify_auth(&join(Some("not hex".into())), Some("k")).is_err());
    }
}
