//! WebSocket framing (RFC 6455 §5) as a state machine without I/O: [`Decoder`] turns the
//! bytes a peer sends into messages, pings, pongs and close frames; [`header`] and
//! [`mask`] build the frames we send. The upgrade handshake is HTTP's business (hyper).
//!
//! Written here rather than taken from a WebSocket crate because the server's two hardest
//! promises live exactly at this layer:
//! - **memory**: an idle connection holds no buffer. The decoder copies what it needs out
//!   of whatever slice it is given (a partial header into 14 inline bytes, a payload into
//!   the message's own buffer), so the caller can read into one scratch buffer per worker
//!   thread and keep nothing between reads;
//! - **accounting**: a data frame's payload is allocated only once the caller has reserved
//!   it from the memory budget: the decoder stops at each data frame header with
//!   [`Decoded::NeedMemory`] and goes on after [`Decoder::grant`], so a client that
//!   announces a large frame and trickles it in holds nothing it was not granted.
//!
//! Extensions are not negotiated, so reserved bits are errors. Text is validated as UTF-8
//! once the message is complete. Every violation maps to the close code RFC 6455 names.

use bytes::Bytes;

use crate::budget::{Budget, Reservation};
use crate::frame::{Frame, FrameKind};

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER: usize = 14;

/// Longest control frame payload.
pub const MAX_CONTROL: usize = 125;

/// Which end of the connection we are: servers receive masked frames and send unmasked
/// ones, clients the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A close frame's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

/// What the decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete text or binary message.
    Message(Frame),
    /// A ping with its payload, to be answered with a pong carrying it.
    Ping(Bytes),
    Pong,
    /// The peer's close frame (`None`: it carried no code).
    Close(Option<Close>),
    /// A data frame of this many payload bytes starts: [`Decoder::grant`] memory for it
    /// before decoding further.
    NeedMemory(usize),
}

/// The peer broke the protocol; the connection is closed with [`ProtocolError::close_code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reserved bits set")]
    ReservedBits,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("frame not masked")]
    Unmasked,
    #[error("frame masked by a server")]
    Masked,
    #[error("continuation frame without a message")]
    StrayContinuation,
    #[error("new message inside a fragmented one")]
    Interleaved,
    #[error("control frame too long or fragmented")]
    BadControl,
    #[error("frame length out of range")]
    BadLength,
    #[error("message too big")]
    TooBig,
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("malformed close frame")]
    BadClose,
}

impl ProtocolError {
    /// The close code RFC 6455 §7.4.1 gives for this violation.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::TooBig => 1009,
            ProtocolError::NotUtf8 => 1007,
            _ => 1002,
        }
    }
}

/// The frame being read.
#[derive(Debug)]
struct FrameState {
    opcode: Opcode,
    fin: bool,
    mask: Option<[u8; 4]>,
    remaining: u64,
    /// Payload bytes read so far (where the mask continues).
    done: u64,
    /// A data frame waiting for [`Decoder::grant`].
    awaiting_memory: bool,
}

/// A data message being assembled, possibly over several frames.
#[derive(Debug)]
struct Assembly {
    kind: FrameKind,
    data: Vec<u8>,
    reservation: Option<Reservation>,
}

/// Decodes one direction of a connection. Holds no heap memory between messages.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_message: usize,
    header: [u8; MAX_HEADER],
    header_len: u8,
    frame: Option<FrameState>,
    message: Option<Assembly>,
    /// A control frame's payload while it is read (at most 125 bytes).
    control: Vec<u8>,
}

impl Decoder {
    /// A decoder for the frames the peer of `role` sends, refusing messages larger than
    /// `max_message` bytes.
    pub fn new(role: Role, max_message: usize) -> Decoder {
        Decoder {
            role,
            max_message,
            header: [0; MAX_HEADER],
            header_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
        }
    }

    /// True while the decoder is inside a frame or a fragmented message.
    pub fn is_mid_message(&self) -> bool {
        self.header_len > 0 || self.frame.is_some() || self.message.is_some()
    }

    /// Gives the data frame announced by [`Decoded::NeedMemory`] its memory. The
    /// reservation travels with the message's bytes until the last holder drops them.
    pub fn grant(&mut self, reservation: Reservation) {
        let Some(frame) = self.frame.as_mut().filter(|f| f.awaiting_memory) else {
            return;
        };
        frame.awaiting_memory = false;
        let len = frame.remaining as usize;
        let message = self.message.get_or_insert_with(|| Assembly {
            kind: if frame.opcode == Opcode::Text {
                FrameKind::Text
            } else {
                FrameKind::Binary
            },
            data: Vec::new(),
            reservation: None,
        });
        message.data.reserve_exact(len);
        match &mut message.reservation {
            Some(held) => held.absorb(reservation),
            None => message.reservation = Some(reservation),
        }
    }

    /// Decodes from `input`: returns how many bytes were consumed and what, if anything,
    /// was completed. Call again with the rest of the input (and after a
    /// [`Decoded::NeedMemory`], once memory is granted).
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Decoded>), ProtocolError> {
        let mut pos = 0;
        loop {
            if self.frame.is_none() {
                let Some(used) = self.read_header(&input[pos..])? else {
                    return Ok((input.len(), None));
                };
                pos += used;
            }
            let frame = self.frame.as_mut().expect("a frame is being read");
            if frame.awaiting_memory {
                return Ok((pos, Some(Decoded::NeedMemory(frame.remaining as usize))));
            }
            let take = (frame.remaining as usize).min(input.len() - pos);
            let chunk = &input[pos..pos + take];
            let target = if frame.opcode.is_control() {
                &mut self.control
            } else {
                &mut self
                    .message
                    .as_mut()
                    .expect("data frames have a message")
                    .data
            };
            let start = target.len();
            target.extend_from_slice(chunk);
            if let Some(key) = frame.mask {
                mask(&mut target[start..], key, frame.done as usize);
            }
            frame.done += take as u64;
            frame.remaining -= take as u64;
            pos += take;
            if frame.remaining > 0 {
                return Ok((pos, None));
            }
            let frame = self.frame.take().expect("a frame is being read");
            if let Some(done) = self.finish(frame)? {
                return Ok((pos, Some(done)));
            }
        }
    }

    /// Collects header bytes; parses the header once complete. `None`: input ran out.
    fn read_header(&mut self, input: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let mut used = 0;
        loop {
            let have = self.header_len as usize;
            let need = header_len(&self.header[..have]);
            if have >= need {
                break;
            }
            let Some(&byte) = input.get(used) else {
                return Ok(None);
            };
            self.header[have] = byte;
            self.header_len += 1;
            used += 1;
        }
        let header = self.header;
        self.header_len = 0;
        self.start_frame(&header)?;
        Ok(Some(used))
    }

    fn start_frame(&mut self, header: &[u8; MAX_HEADER]) -> Result<(), ProtocolError> {
        let fin = header[0] & 0x80 != 0;
        if header[0] & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let bits = header[0] & 0x0f;
        let opcode = Opcode::from_bits(bits).ok_or(ProtocolError::UnknownOpcode(bits))?;
        let masked = header[1] & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(ProtocolError::Unmasked),
            (Role::Client, true) => return Err(ProtocolError::Masked),
            _ => {}
        }
        let (len, at) = match header[1] & 0x7f {
            126 => (u16::from_be_bytes([header[2], header[3]]) as u64, 4),
            127 => {
                let len = u64::from_be_bytes(header[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ProtocolError::BadLength);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let mask = masked.then(|| header[at..at + 4].try_into().expect("4 bytes"));
        if opcode.is_control() {
            if !fin || len > MAX_CONTROL as u64 {
                return Err(ProtocolError::BadControl);
            }
        } else {
            match (opcode, &self.message) {
                (Opcode::Continuation, None) => return Err(ProtocolError::StrayContinuation),
                (Opcode::Text | Opcode::Binary, Some(_)) => return Err(ProtocolError::Interleaved),
                _ => {}
            }
            let so_far = self.message.as_ref().map_or(0, |m| m.data.len()) as u64;
            if so_far + len > self.max_message as u64 {
                return Err(ProtocolError::TooBig);
            }
            if self.message.is_none() && len == 0 {
                // An empty first fragment still starts a message.
                self.message = Some(Assembly {
                    kind: if opcode == Opcode::Text {
                        FrameKind::Text
                    } else {
                        FrameKind::Binary
                    },
                    data: Vec::new(),
                    reservation: None,
                });
            }
        }
        self.frame = Some(FrameState {
            opcode,
            fin,
            mask,
            remaining: len,
            done: 0,
            awaiting_memory: !opcode.is_control() && len > 0,
        });
        Ok(())
    }

    /// A frame's payload is complete: what it makes, if anything.
    fn finish(&mut self, frame: FrameState) -> Result<Option<Decoded>, ProtocolError> {
        match frame.opcode {
            Opcode::Ping => Ok(Some(Decoded::Ping(Bytes::from(std::mem::take(
                &mut self.control,
            ))))),
            Opcode::Pong => {
                self.control = Vec::new();
                Ok(Some(Decoded::Pong))
            }
            Opcode::Close => {
                let payload = std::mem::take(&mut self.control);
                parse_close(&payload).map(|c| Some(Decoded::Close(c)))
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation if frame.fin => {
                let message = self.message.take().expect("data frames have a message");
                let data = match message.reservation {
                    Some(reservation) => Budget::charged(message.data, reservation),
                    None => Bytes::new(),
                };
                Frame::new(message.kind, data)
                    .map(|frame| Some(Decoded::Message(frame)))
                    .ok_or(ProtocolError::NotUtf8)
            }
            _ => Ok(None),
        }
    }
}

/// Bytes the header starting with `have` needs in all (at least 2).
fn header_len(have: &[u8]) -> usize {
    if have.len() < 2 {
        return 2;
    }
    let len = match have[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    len + if have[1] & 0x80 != 0 { 4 } else { 0 }
}

fn parse_close(payload: &[u8]) -> Result<Option<Close>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| ProtocolError::NotUtf8)?;
            if !valid {
                return Err(ProtocolError::BadClose);
            }
            Ok(Some(Close {
                code,
                reason: reason.to_string(),
            }))
        }
    }
}

/// A frame header: `fin` set, `opcode`, `len` payload bytes, masked with `key` if given.
/// Returns the bytes and how many of them are used.
pub fn header(opcode: Opcode, len: usize, key: Option<[u8; 4]>) -> ([u8; MAX_HEADER], usize) {
    let mut out = [0u8; MAX_HEADER];
    out[0] = 0x80 | opcode as u8;
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    let mut at = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(key) = key {
        out[at..at + 4].copy_from_slice(&key);
        at += 4;
    }
    (out, at)
}

/// XORs `data` with the masking `key`, `offset` bytes into the payload.
pub fn mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let rotated = u32::from_ne_bytes(key).rotate_right(8 * (offset % 4) as u32);
    let key = rotated.to_ne_bytes();
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let value = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// The payload of a close frame with `code` and `reason` (cut to fit a control frame).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = Vec::with_capacity(2 + cut);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..cut]);
    out
}

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A fresh `Sec-WebSocket-Key` for a client's upgrade request.
pub fn client_key() -> String {
    use base64::Engine;
    let mut nonce = [0u8; 16];
    // The key only guards against confused caches, not attackers.
    let _ = getrandom::getrandom(&mut nonce);
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked frame as a client sends it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let op = Opcode::from_bits(opcode).unwrap_or(Opcode::Binary);
        let (mut h, n) = header(op, payload.len(), Some(key));
        if !fin {
            h[0] &= 0x7f;
        }
        h[0] = (h[0] & 0xf0) | opcode;
        let mut out = h[..n].to_vec();
        let mut body = payload.to_vec();
        mask(&mut body, key, 0);
        out.extend_from_slice(&body);
        out
    }

    /// Feeds `input` in pieces of `step` bytes, granting all memory asked for.
    fn decode_all(
        decoder: &mut Decoder,
        input: &[u8],
        step: usize,
    ) -> Result<Vec<Decoded>, ProtocolError> {
        let budget = Budget::new(1 << 30);
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            let mut at = 0;
            loop {
                let (used, done) = decoder.decode(&piece[at..])?;
                at += used;
                match done {
                    Some(Decoded::NeedMemory(n)) => {
                        decoder.grant(budget.try_reserve(n, crate::budget::Need::Service).unwrap())
                    }
                    Some(d) => out.push(d),
                    None => break,
                }
                if at == piece.len() && !decoder.is_mid_message() {
                    break;
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_decode_whole_or_byte_by_byte() {
        let key = [1, 2, 3, 4];
        let mut input = client_frame(true, 1, "héllo".as_bytes(), key);
        input.extend(client_frame(true, 2, &[0u8; 300], [9, 9, 9, 9]));
        input.extend(client_frame(true, 2, &vec![7u8; 70_000], key));
        input.extend(client_frame(true, 9, b"ping", key));
        input.extend(client_frame(false, 1, b"frag", key));
        input.extend(client_frame(true, 10, b"", key)); // a pong between fragments
        input.extend(client_frame(true, 0, b"mented", key));
        input.extend(client_frame(true, 8, &close_payload(1000, "bye"), key));
        for step in [1, 3, 7, 64, 1 << 20] {
            let mut d = Decoder::new(Role::Server, 1 << 20);
            let got = decode_all(&mut d, &input, step).unwrap();
            assert_eq!(got.len(), 7, "step {step}");
            assert_eq!(got[0], Decoded::Message(Frame::text("héllo")));
            assert_eq!(got[1], Decoded::Message(Frame::binary(vec![0u8; 300])));
            assert_eq!(got[2], Decoded::Message(Frame::binary(vec![7u8; 70_000])));
            assert_eq!(got[3], Decoded::Ping(Bytes::from_static(b"ping")));
            assert_eq!(got[4], Decoded::Pong);
            assert_eq!(got[5], Decoded::Message(Frame::text("fragmented")));
            assert_eq!(
                got[6],
                Decoded::Close(Some(Close {
                    code: 1000,
                    reason: "bye".into()
                }))
            );
            assert!(!d.is_mid_message());
        }
    }

    #[test]
    fn protocol_violations_are_refused_with_their_code() {
        let key = [5, 6, 7, 8];
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (
                {
                    let mut f = client_frame(true, 1, b"x", key);
                    f[0] |= 0x40;
                    f
                },
                ProtocolError::ReservedBits,
            ),
            (
                client_frame(true, 3, b"x", key),
                ProtocolError::UnknownOpcode(3),
            ),
            (vec![0x81, 0x01, b'x'], ProtocolError::Unmasked),
            (
                client_frame(true, 0, b"x", key),
                ProtocolError::StrayContinuation,
            ),
            (
                {
                    let mut f = client_frame(false, 1, b"a", key);
                    f.extend(client_frame(true, 2, b"b", key));
                    f
                },
                ProtocolError::Interleaved,
            ),
            (client_frame(false, 9, b"p", key), ProtocolError::BadControl),
            (
                client_frame(true, 9, &[0u8; 126], key),
                ProtocolError::BadControl,
            ),
            (
                client_frame(true, 2, &[0u8; 101], key),
                ProtocolError::TooBig,
            ),
            (
                client_frame(true, 1, &[0xff, 0xfe], key),
                ProtocolError::NotUtf8,
            ),
            (client_frame(true, 8, &[3], key), ProtocolError::BadClose),
            (
                client_frame(true, 8, &close_payload(1005, ""), key),
                ProtocolError::BadClose,
            ),
            (
                {
                    let mut f = vec![0x82, 0xff];
                    f.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0]);
                    f.extend_from_slice(&key);
                    f
                },
                ProtocolError::BadLength,
            ),
        ];
        for (input, want) in cases {
            let mut d = Decoder::new(Role::Server, 100);
            assert_eq!(
                decode_all(&mut d, &input, 1 << 20),
                Err(want.clone()),
                "{want:?}"
            );
        }
        // A server's frames must not be masked.
        let mut d = Decoder::new(Role::Client, 100);
        assert_eq!(
            decode_all(&mut d, &client_frame(true, 1, b"x", key), 64),
            Err(ProtocolError::Masked)
        );
        assert_eq!(ProtocolError::TooBig.close_code(), 1009);
        assert_eq!(ProtocolError::NotUtf8.close_code(), 1007);
        assert_eq!(ProtocolError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn a_large_frame_waits_for_memory_and_holds_it_until_dropped() {
        let budget = Budget::new(1 << 20);
        let mut d = Decoder::new(Role::Server, 1 << 20);
        let input = client_frame(true, 2, &[1u8; 1000], [1, 1, 1, 1]);
        let (used, got) = d.decode(&input).unwrap();
        assert_eq!(got, Some(Decoded::NeedMemory(1000)));
        assert_eq!(used, 4 + 4, "only the header is consumed");
        // Without a grant nothing moves.
        assert_eq!(
            d.decode(&input[used..]).unwrap(),
            (0, Some(Decoded::NeedMemory(1000)))
        );
        d.grant(
            budget
                .try_reserve(1000, crate::budget::Need::Service)
                .unwrap(),
        );
        let (rest, got) = d.decode(&input[used..]).unwrap();
        assert_eq!(rest, 1000);
        let Some(Decoded::Message(frame)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(budget.used(), 1000);
        drop(frame);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_accept_key_is_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(client_key().len(), 24);
    }

    #[test]
    fn headers_and_masks_round_trip() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let key = [0xde, 0xad, 0xbe, 0xef];
            let (h, n) = header(Opcode::Binary, len, Some(key));
            assert_eq!(header_len(&h[..2]), n);
            let (h2, n2) = header(Opcode::Text, len, None);
            assert_eq!(header_len(&h2[..2]), n2);
        }
        let mut data: Vec<u8> = (0..=255).collect();
        let original = data.clone();
        let key = [1, 2, 3, 4];
        // Masking in two pieces at an odd offset equals masking whole.
        let (a, b) = data.split_at_mut(13);
        mask(a, key, 0);
        mask(b, key, 13);
        let mut whole = original.clone();
        mask(&mut whole, key, 0);
        assert_eq!(data, whole);
        mask(&mut whole, key, 0);
        assert_eq!(whole, original);
        assert_eq!(close_payload(1000, &"é".repeat(100)).len(), 2 + 122);
    }
}
