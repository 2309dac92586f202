//! Property tests (proptest) of the two parsers in `protocol` that read bytes from anyone
//! on the network: the join (first) frame parser and the peer envelope decoder. They run
//! on random input, on random JSON shaped like a join frame, and on valid frames and
//! envelopes with corruption applied, so that no input can panic the server, no accepted
//! frame carries an invalid name, and no history frame carries a credential.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::*;

/// A valid uid or channel: 1-256 printable ASCII characters.
fn name() -> impl Strategy<Value = String> {
    "[ -~]{1,256}"
}

/// An invalid one: empty, too long, or holding a character outside printable ASCII.
fn bad_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ -~]{257,300}",
        (
            "[ -~]{0,20}",
            "[\u{0}-\u{1f}\u{7f}-\u{10ffff}]",
            "[ -~]{0,20}"
        )
            .prop_map(|(a, bad, b)| format!("{a}{bad}{b}")),
    ]
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    json_with(true)
}

/// JSON values without fractional numbers: serde_json (without its `float_roundtrip`
/// feature) may read a float back a last digit off, so a client's floats in a frame whose
/// `auth` is stripped can come out of history slightly changed. Frames compared byte for
/// byte use these.
fn exact_json() -> impl Strategy<Value = Value> {
    json_with(false)
}

fn json_with(floats: bool) -> impl Strategy<Value = Value> {
    let float = any::<f64>()
        .prop_filter("finite", |f| f.is_finite())
        .prop_map(Value::from);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        if floats {
            float.boxed()
        } else {
            any::<i64>().prop_map(Value::from).boxed()
        },
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A field name, often one the parser looks at.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("uid".to_string()),
        Just("channel".to_string()),
        Just("auth".to_string()),
        Just("presence".to_string()),
        ".{0,12}",
    ]
}

/// JSON text shaped like a join frame: the fields the parser reads, with values of every
/// type (valid names most often), plus other fields, in any order, some repeated.
fn join_like() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        3 => name().prop_map(Value::String),
        1 => bad_name().prop_map(Value::String),
        1 => json(),
    ];
    prop::collection::vec((key(), value), 0..8).prop_map(|fields| {
        // Written by hand, not through a Map, so that repeated keys reach the parser.
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

/// Any text a client could send as its first frame.
fn first_frame() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        join_like(),
        // A valid frame with a few bytes replaced, cut short or doubled.
        (join_like(), any::<prop::sample::Index>(), ".{0,3}").prop_map(|(text, at, junk)| {
            let mut cut = at.index(text.len() + 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}{junk}{}", &text[..cut], &text[cut..])
        }),
        json().prop_map(|v| v.to_string()),
    ]
}

/// Other fields a client may add to its join frame (not ones the parser reads).
fn extras() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::vec(
        (
            "[a-z_]{1,10}".prop_filter("not a join field", |k| {
                !["uid", "channel", "auth", "presence"].contains(&k.as_str())
            }),
            exact_json(),
        ),
        0..4,
    )
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// No first frame panics the parser; whatever it accepts has valid names, and its
    /// history frame is a JSON object with the same uid and channel and no `auth`.
    #[test]
    fn any_first_frame_is_parsed_or_refused_without_panic(text in first_frame()) {
        let Ok(join) = parse_join(&text) else {
            return Ok(());
        };
        for name in [&join.uid, &join.channel] {
            prop_assert!((1..=MAX_NAME_LEN).contains(&name.len()), "{name:?}");
            prop_assert!(printable(name), "{name:?}");
        }
        let history: Value = serde_json::from_str(&join.history_frame)
            .map_err(|e| TestCaseError::fail(format!("history frame is not JSON: {e}")))?;
        let history = history.as_object().expect("an object");
        prop_assert!(!history.contains_key("auth"), "{}", join.history_frame);
        prop_assert_eq!(history.get("uid"), Some(&Value::String(join.uid.clone())));
        prop_assert_eq!(history.get("channel"), Some(&Value::String(join.channel.clone())));
        if join.auth.is_none() && !text.contains("auth") {
            // Nothing to strip: history keeps the client's bytes.
            prop_assert_eq!(&join.history_frame, &text);
        }
    }

    /// A valid join frame, with or without auth and presence and with fields of the
    /// client's own, parses to exactly what was sent, and its history frame is the frame
    /// minus `auth`: the token itself appears nowhere in it.
    #[test]
    fn valid_join_frames_round_trip_and_history_never_holds_the_token(
        uid in name(),
        channel in name(),
        auth in proptest::option::of("[0-9a-f]{16}"),
        presence in proptest::option::of(any::<bool>()),
        extras in extras(),
        auth_first in any::<bool>(),
    ) {
        let mut object = Map::new();
        if auth_first {
            if let Some(auth) = &auth {
                object.insert("auth".into(), Value::String(auth.clone()));
            }
        }
        object.insert("uid".into(), Value::String(uid.clone()));
        object.insert("channel".into(), Value::String(channel.clone()));
        if let Some(presence) = presence {
            object.insert("presence".into(), Value::Bool(presence));
        }
        for (k, v) in &extras {
            object.insert(k.clone(), v.clone());
        }
        if !auth_first {
            if let Some(auth) = &auth {
                object.insert("auth".into(), Value::String(auth.clone()));
            }
        }
        let text = Value::Object(object.clone()).to_string();
        let parsed = parse_join(&text);
        if text.len() > MAX_JOIN_FRAME {
            prop_assert_eq!(parsed, Err(JoinError::TooLong));
            return Ok(());
        }
        let join = parsed.map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(&join.uid, &uid);
        prop_assert_eq!(&join.channel, &channel);
        prop_assert_eq!(&join.auth, &auth);
        prop_assert_eq!(join.presence, presence.unwrap_or(false));
        object.remove("auth");
        prop_assert_eq!(&join.history_frame, &Value::Object(object).to_string());
        if let Some(token) = &auth {
            let elsewhere = uid.contains(token.as_str())
                || channel.contains(token.as_str())
                || extras.iter().any(|(k, v)| k.contains(token.as_str()) || v.to_string().contains(token.as_str()));
            prop_assume!(!elsewhere);
            prop_assert!(!join.history_frame.contains(token.as_str()), "{}", join.history_frame);
        }
    }

    /// Repeated `auth` fields, however spelled in JSON, leave no token in history.
    #[test]
    fn repeated_or_escaped_auth_fields_are_all_stripped(
        first in "[0-9a-f]{16}",
        second in "[0-9a-f]{16}",
        escaped in any::<bool>(),
    ) {
        let field = if escaped { r#""\u0061uth""# } else { r#""auth""# };
        let text = format!(
            r#"{{{field}:"{first}","uid":"u","channel":"c",{field}:"{second}"}}"#
        );
        let join = parse_join(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(!join.history_frame.contains(first.as_str()), "{}", join.history_frame);
        prop_assert!(!join.history_frame.contains(second.as_str()), "{}", join.history_frame);
    }

    /// A bad uid or channel is refused with the field it concerns.
    #[test]
    fn bad_names_are_refused(bad in bad_name(), good in name(), bad_uid in any::<bool>()) {
        let (uid, channel, field) = if bad_uid {
            (bad, good, "uid")
        } else {
            (good, bad, "channel")
        };
        let text = serde_json::json!({"uid": uid, "channel": channel}).to_string();
        prop_assume!(text.len() <= MAX_JOIN_FRAME);
        prop_assert_eq!(parse_join(&text), Err(JoinError::BadName(field)));
    }
}

/// An envelope's kind.
fn kind() -> impl Strategy<Value = EnvelopeKind> {
    prop_oneof![
        Just(EnvelopeKind::Text),
        Just(EnvelopeKind::Binary),
        Just(EnvelopeKind::Join),
    ]
}

/// A valid envelope's parts: an origin of 1-255 bytes of UTF-8, any number, and a payload
/// that is UTF-8 unless the frame is binary.
fn envelope_parts() -> impl Strategy<Value = (EnvelopeKind, String, u64, Vec<u8>)> {
    (
        kind(),
        ".{1,100}".prop_filter("1-255 bytes", |o| (1..=255).contains(&o.len())),
        any::<u64>(),
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, origin, seq, text, bytes)| {
            let payload = if kind == EnvelopeKind::Binary {
                bytes
            } else {
                text.into_bytes()
            };
            (kind, origin, seq, payload)
        })
}

/// Bytes for the decoder: random, or a random header (the magic, a kind byte that is
/// mostly valid, a short origin length, often 0) in front of random bytes.
fn envelope_like() -> impl Strategy<Value = Vec<u8>> {
    let bytes = prop::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        bytes.clone(),
        (
            any::<bool>(),
            0..4u8,
            prop_oneof![Just(0u8), 0..16u8, any::<u8>()],
            bytes
        )
            .prop_map(|(magic, kind, len, rest)| {
                let mut data = if magic {
                    ENVELOPE_MAGIC.to_vec()
                } else {
                    b"MLP2".to_vec()
                };
                data.push(kind);
                data.push(len);
                data.extend_from_slice(&rest);
                data
            }),
    ]
}

/// A change to an encoded envelope: a byte flipped, the end cut off, bytes appended or
/// inserted.
#[derive(Debug, Clone)]
enum Corruption {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Append(Vec<u8>),
    Insert(prop::sample::Index, u8),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Corruption::Flip(i, x)),
        any::<prop::sample::Index>().prop_map(Corruption::Truncate),
        prop::collection::vec(any::<u8>(), 1..8).prop_map(Corruption::Append),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Corruption::Insert(i, b)),
    ]
}

fn corrupt(mut data: Vec<u8>, how: &Corruption) -> Vec<u8> {
    match how {
        Corruption::Flip(at, x) => {
            let at = at.index(data.len());
            data[at] ^= x;
        }
        Corruption::Truncate(at) => data.truncate(at.index(data.len())),
        Corruption::Append(more) => data.extend_from_slice(more),
        Corruption::Insert(at, byte) => data.insert(at.index(data.len() + 1), *byte),
    }
    data
}

/// What every accepted envelope must satisfy: it is exactly the encoding of what it
/// decoded to (so nothing in it was skipped or misread), with a non-empty origin and a
/// UTF-8 payload for text and join frames.
fn check_accepted(data: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(envelope) = Envelope::decode(data) {
        prop_assert!(!envelope.origin.is_empty());
        if envelope.kind != EnvelopeKind::Binary {
            prop_assert!(std::str::from_utf8(envelope.payload).is_ok());
        }
        prop_assert_eq!(envelope.encode(), data.to_vec());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Random bytes, bare or shaped like an envelope's header, never panic the decoder, and
    /// whatever it accepts re-encodes to the same bytes.
    #[test]
    fn random_bytes_are_refused_or_decoded_exactly(data in envelope_like()) {
        check_accepted(&data)?;
    }

    /// encode then decode gives back the same envelope.
    #[test]
    fn envelopes_round_trip((kind, origin, seq, payload) in envelope_parts()) {
        let envelope = Envelope { kind, origin: &origin, seq, payload: &payload };
        let bytes = envelope.encode();
        prop_assert_eq!(Envelope::decode(&bytes), Ok(envelope));
    }

    /// A corrupted encoding is refused, or decodes to an envelope that re-encodes to the
    /// corrupted bytes (e.g. a flipped payload byte is a different, valid payload).
    #[test]
    fn corrupted_envelopes_are_refused_or_decoded_exactly(
        (kind, origin, seq, payload) in envelope_parts(),
        how in corruption(),
    ) {
        let envelope = Envelope { kind, origin: &origin, seq, payload: &payload };
        let data = corrupt(envelope.encode(), &how);
        check_accepted(&data)?;
    }
}
