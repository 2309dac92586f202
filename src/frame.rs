//! A data frame as the hub stores it and every member receives it: text or binary, and its
//! bytes. The bytes are shared (`Bytes`), so a frame stored once is delivered to any number
//! of members without a copy; a text frame's bytes are valid UTF-8 by construction.

use bytes::Bytes;

/// Text or binary: the WebSocket frame type a frame is delivered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Text,
    Binary,
}

/// One Mles frame: its kind and payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    kind: FrameKind,
    data: Bytes,
}

impl Frame {
    /// A text frame.
    pub fn text(text: impl Into<String>) -> Frame {
        Frame {
            kind: FrameKind::Text,
            data: Bytes::from(text.into()),
        }
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Frame {
        Frame {
            kind: FrameKind::Binary,
            data: data.into(),
        }
    }

    /// A frame of `kind` over `data`; `None` for a text frame that is not UTF-8.
    pub fn new(kind: FrameKind, data: Bytes) -> Option<Frame> {
        if kind == FrameKind::Text && std::str::from_utf8(&data).is_err() {
            return None;
        }
        Some(Frame { kind, data })
    }

    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    pub fn is_text(&self) -> bool {
        self.kind == FrameKind::Text
    }

    /// The payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The payload of a text frame as `str`.
    pub fn as_text(&self) -> Option<&str> {
        match self.kind {
            // Checked when the frame was made.
            FrameKind::Text => std::str::from_utf8(&self.data).ok(),
            FrameKind::Binary => None,
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_text() {
            Some(text) if text.len() <= 64 => write!(f, "Text({text:?})"),
            _ => write!(f, "{:?}({} bytes)", self.kind, self.data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_are_utf8() {
        assert!(Frame::new(FrameKind::Text, Bytes::from_static(b"\xff")).is_none());
        assert!(Frame::new(FrameKind::Binary, Bytes::from_static(b"\xff")).is_some());
        let f = Frame::text("héllo");
        assert_eq!(f.as_text(), Some("héllo"));
        assert_eq!(f.len(), 6);
        assert_eq!(Frame::binary(vec![1u8]).as_text(), None);
    }
}
