//! Property tests (proptest) of the history log loader, which reads files that a crash, a
//! full disk or anyone with access to the cache directory may have left damaged: `read_log`
//! never panics on random or corrupted files, reads back exactly what was written, and of
//! a damaged file keeps exactly the records before the first damaged one.
//!
//! The format is reached only through [`write_log`] and [`read_log`], so a change of the
//! format or of the loader's signature is one place to adapt here.

use proptest::prelude::*;

use super::*;

/// One record's worth: origin, sequence number, live, and a text or binary payload.
type Record = (String, u64, bool, Frame);

fn record() -> impl Strategy<Value = Record> {
    let payload = prop_oneof![
        ".{0,60}".prop_map(Frame::text),
        prop::collection::vec(any::<u8>(), 0..120).prop_map(Frame::binary),
    ];
    (
        // Origins are a server id (printable ASCII) and a boot epoch in practice; any UTF-8
        // up to the 255 bytes the format holds is fine.
        ".{0,60}".prop_filter("at most 255 bytes", |o| o.len() <= 255),
        any::<u64>(),
        any::<bool>(),
        payload,
    )
}

/// Writes `records` as a log of channel "c"; returns its bytes and where each record ends,
/// the name record first.
fn write_log(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
    let mut data = Vec::new();
    name_record("c", 1, &mut data);
    let mut ends = vec![data.len()];
    for (origin, seq, live, msg) in records {
        let entry = Entry {
            seq: *seq,
            from: 0,
            live: *live,
            key: MsgKey {
                origin: Arc::from(origin.as_str()),
                seq: *seq,
            },
            frame: msg.clone(),
            stream: None,
        };
        encode(&entry, &mut data);
        ends.push(data.len());
    }
    (data, ends)
}

/// Loads `data` from a file: the records read, and the offset of the first damaged one.
fn read_log(data: &[u8]) -> (Vec<Record>, Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("channel.log");
    fs::write(&path, data).unwrap();
    let log = super::read_log(&path, usize::MAX, usize::MAX).expect("a readable file loads");
    let records = log
        .entries
        .into_iter()
        .map(|(key, live, msg, _position)| (key.origin.to_string(), key.seq, live, msg))
        .collect();
    (records, log.damaged_at.map(|at| at as usize))
}

/// The records wholly inside the first `len` bytes, and where the first one that is not
/// (if any) starts. `ends[0]` is the end of the name record.
fn prefix(records: &[Record], ends: &[usize], len: usize) -> (Vec<Record>, Option<usize>) {
    let whole = ends.iter().take_while(|&&end| end <= len).count();
    let start = if whole == 0 { 0 } else { ends[whole - 1] };
    let damaged = (start < len).then_some(start);
    (records[..whole.saturating_sub(1)].to_vec(), damaged)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a file holds, loading it does not panic, and it stops inside the file.
    #[test]
    fn random_files_load_without_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let (records, corrupt) = read_log(&data);
        match corrupt {
            Some(at) => prop_assert!(at < data.len().max(1)),
            None => prop_assert!(data.is_empty() || !records.is_empty()),
        }
    }

    /// A log reads back exactly as written.
    #[test]
    fn logs_round_trip(records in prop::collection::vec(record(), 0..12)) {
        let (data, _) = write_log(&records);
        prop_assert_eq!(read_log(&data), (records, None));
    }

    /// A log cut anywhere (a crash mid-write) keeps exactly the whole records before the
    /// cut, and says where the torn one starts.
    #[test]
    fn a_truncated_log_keeps_exactly_its_whole_records(
        records in prop::collection::vec(record(), 1..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let (data, ends) = write_log(&records);
        let len = cut.index(data.len() + 1);
        prop_assert_eq!(read_log(&data[..len]), prefix(&records, &ends, len));
    }

    /// A byte changed anywhere ends the load at the record holding it: the records before
    /// it are kept, none after.
    #[test]
    fn a_damaged_record_ends_the_load_and_keeps_what_came_before(
        records in prop::collection::vec(record(), 1..12),
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
    ) {
        let (mut data, ends) = write_log(&records);
        let at = at.index(data.len());
        data[at] ^= flip;
        let damaged = ends.iter().position(|&end| at < end).expect("inside a record");
        let start = if damaged == 0 { 0 } else { ends[damaged - 1] };
        // A CRC-32 collision (about 1 in 4 billion) is the one way a change could pass.
        // Record `damaged` is the name record (0) or frame `damaged - 1`.
        let kept = records[..damaged.saturating_sub(1)].to_vec();
        prop_assert_eq!(read_log(&data), (kept, Some(start)));
    }

    /// Garbage after the last record (a torn write of the next) keeps every record.
    #[test]
    fn garbage_after_the_records_keeps_them_all(
        records in prop::collection::vec(record(), 0..12),
        garbage in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let (mut data, _) = write_log(&records);
        let len = data.len();
        data.extend_from_slice(&garbage);
        prop_assert_eq!(read_log(&data), (records, Some(len)));
    }
}
