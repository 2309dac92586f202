//! A client of the resume extension: joins asking for position marks (and resuming from
//! one), and sorts what it receives into data frames, marks and the `recovered` answer.

use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use super::{recv, Ws, WAIT};

/// The join frame of a client that asks for marks, resuming from `since` if given.
pub fn resuming_join(uid: &str, channel: &str, since: Option<&str>) -> String {
    let mut join = serde_json::json!({"uid": uid, "channel": channel, "positions": true});
    if let Some(since) = since {
        join["since"] = since.into();
    }
    join.to_string()
}

/// What a client received: data frames (not join frames) in order, the last position
/// mark, and the `recovered` answer if there was one.
#[derive(Debug, Default)]
pub struct Received {
    pub recovered: Option<bool>,
    pub data: Vec<String>,
    pub last_mark: Option<String>,
    pub marks: usize,
}

/// Reads until `want` data frames and a mark after them arrived (or nothing comes for a
/// moment when `want` is reached).
pub async fn receive(ws: &mut Ws, want: usize) -> Received {
    let mut got = Received::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let quiet = if got.data.len() >= want && got.last_mark.is_some() {
            Duration::from_millis(300)
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        let next = match tokio::time::timeout(quiet, recv(ws)).await {
            Ok(msg) => msg,
            Err(_) if got.data.len() >= want => return got,
            Err(_) => panic!("only {got:?} of {want} frames"),
        };
        let Message::Text(text) = next else {
            panic!("unexpected {next:?}")
        };
        let value: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        match value.as_ref() {
            Some(v) if v.get("position").is_some() => {
                got.marks += 1;
                got.last_mark = v["position"].as_str().map(String::from);
            }
            Some(v) if v.get("recovered").is_some() => {
                assert!(
                    got.recovered.is_none() && got.data.is_empty() && got.marks == 0,
                    "recovered comes first: {got:?}"
                );
                got.recovered = v["recovered"].as_bool();
            }
            Some(v) if v.get("uid").is_some() => {} // join frames in history
            _ => got.data.push(text.to_string()),
        }
    }
}
