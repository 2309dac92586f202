//! The join frame: what is refused, with which close code and reason, and auth.

mod common;
use common::*;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn refused_with(server: &TestServer, frame: Message) -> (u16, String) {
    let mut ws = connect(server.addr).await;
    futures::SinkExt::send(&mut ws, frame).await.unwrap();
    expect_close(&mut ws).await
}

#[tokio::test]
async fn every_bad_first_frame_is_closed_with_1008_and_a_reason() {
    let server = start().await;
    let cases = [
        (Message::text("not json"), "not a JSON object"),
        (Message::text("[]"), "not a JSON object"),
        (Message::text(r#"{"channel":"c"}"#), "'uid' missing"),
        (Message::text(r#"{"uid":"u"}"#), "'channel' missing"),
        (
            Message::text(r#"{"uid":1,"channel":"c"}"#),
            "'uid' has the wrong type",
        ),
        (
            Message::text(r#"{"uid":"u","channel":""}"#),
            "'channel' must be 1-256",
        ),
        (
            Message::text(format!(r#"{{"uid":"{}","channel":"c"}}"#, "x".repeat(300))),
            "'uid' must be 1-256",
        ),
        (
            Message::text(r#"{"uid":"u","channel":"c","auth":5}"#),
            "'auth' has the wrong type",
        ),
        (
            Message::binary(br#"{"uid":"u","channel":"c"}"#.to_vec()),
            "must be a text frame",
        ),
    ];
    for (frame, reason) in cases {
        let (code, got) = refused_with(&server, frame.clone()).await;
        assert_eq!(code, 1008, "{frame:?}");
        assert!(
            got.contains(reason),
            "{frame:?}: reason {got:?} lacks {reason:?}"
        );
    }
    // The server carries on for everyone else.
    let mut a = join_now(&server, "a", "fine").await;
    let mut b = join(server.addr, "b", "fine").await;
    recv_text(&mut b).await;
    send_text(&mut a, "still serving").await;
    assert_eq!(recv_text(&mut b).await, "still serving");
}

#[tokio::test]
async fn a_client_that_never_sends_its_join_frame_is_closed_after_the_timeout() {
    let server = start_with(|c| c.session.first_frame_timeout = Duration::from_millis(300)).await;
    let mut ws = connect(server.addr).await;
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("timeout"), "{reason}");
}

#[tokio::test]
async fn an_upgrade_without_the_mles_subprotocol_is_refused_with_4xx() {
    let server = start().await;
    for offered in [None, Some("chat"), Some("mles-websocket-v3")] {
        let err = connect_with(server.addr, offered)
            .await
            .expect_err("refused");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert!(
                    response.status().is_client_error(),
                    "{:?}",
                    response.status()
                )
            }
            other => panic!("expected an HTTP refusal, got {other}"),
        }
    }
}

#[tokio::test]
async fn the_subprotocol_is_accepted_when_offered_in_a_list() {
    let server = start().await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/",
            server.addr
        ))
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "chat, mles-websocket".parse().unwrap(),
    );
    let (_ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("accepted");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "mles-websocket"
    );
}

mod auth {
    use super::*;
    use siphasher::sip::SipHasher;
    use std::hash::Hasher;

    /// The mles v2 token computed here independently of the server's code.
    fn token(uid: &str, channel: &str, key: Option<&str>) -> String {
        let mut h = SipHasher::new_with_keys(0, 0);
        h.write(uid.as_bytes());
        h.write(channel.as_bytes());
        if let Some(k) = key {
            h.write(k.as_bytes());
        }
        format!("{:x}", h.finish())
    }

    fn frame(uid: &str, channel: &str, auth: Option<&str>) -> Message {
        let mut v = serde_json::json!({"uid": uid, "channel": channel});
        if let Some(a) = auth {
            v["auth"] = a.into();
        }
        Message::text(v.to_string())
    }

    /// Sends `frame` and tells whether it joined: a joined member receives what a probe
    /// member (joined with a valid token for `key`) sends; a refused one gets a close.
    async fn joined(server: &TestServer, frame: Message, channel: &str, key: Option<&str>) -> bool {
        let mut ws = connect(server.addr).await;
        futures::SinkExt::send(&mut ws, frame).await.unwrap();
        let probe_uid = format!("probe-{}", rand_id());
        let mut probe = connect(server.addr).await;
        let probe_frame = self::frame(&probe_uid, channel, Some(&token(&probe_uid, channel, key)));
        futures::SinkExt::send(&mut probe, probe_frame)
            .await
            .unwrap();
        send_text(&mut probe, "ping").await;
        loop {
            match recv(&mut ws).await {
                Message::Text(t) if t.as_str() == "ping" => return true,
                Message::Text(_) => continue,
                Message::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), 1008);
                    assert_eq!(f.reason.as_str(), "authentication failed");
                    return false;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn rand_id() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[tokio::test]
    async fn with_a_key_only_the_keyed_token_joins() {
        let server = start_with(|c| c.key = Some("s3cret".into())).await;
        let key = Some("s3cret");
        let unkeyed = token("alice", "k", None);
        let good = token("alice", "k", key);
        assert!(
            !joined(&server, frame("alice", "k", None), "k", key).await,
            "missing auth joined"
        );
        assert!(
            !joined(&server, frame("alice", "k", Some(&unkeyed)), "k", key).await,
            "unkeyed auth joined"
        );
        assert!(
            !joined(&server, frame("alice", "k", Some("deadbeef")), "k", key).await,
            "wrong auth joined"
        );
        assert!(
            joined(&server, frame("alice", "k", Some(&good)), "k", key).await,
            "good auth refused"
        );
        assert_eq!(server.shared.metrics.auth_failures.get(), 3);
    }

    #[tokio::test]
    async fn with_a_key_the_right_token_joins_and_relays() {
        let server = start_with(|c| c.key = Some("s3cret".into())).await;
        let mut a = connect(server.addr).await;
        futures::SinkExt::send(
            &mut a,
            frame("alice", "k", Some(&token("alice", "k", Some("s3cret")))),
        )
        .await
        .unwrap();
        let mut b = connect(server.addr).await;
        futures::SinkExt::send(
            &mut b,
            frame("bob", "k", Some(&token("bob", "k", Some("s3cret")))),
        )
        .await
        .unwrap();
        assert_eq!(recv_text(&mut b).await, r#"{"uid":"alice","channel":"k"}"#);
        send_text(&mut a, "authenticated").await;
        assert_eq!(recv_text(&mut b).await, "authenticated");
    }

    #[tokio::test]
    async fn without_a_key_auth_is_optional_but_must_match_when_present() {
        let server = start().await;
        assert!(joined(&server, frame("u1", "open", None), "open", None).await);
        assert!(
            joined(
                &server,
                frame("u2", "open", Some(&token("u2", "open", None))),
                "open",
                None
            )
            .await
        );
        assert!(!joined(&server, frame("u3", "open", Some("0123")), "open", None).await);
        assert_eq!(server.shared.metrics.auth_failures.get(), 1);
    }
}
