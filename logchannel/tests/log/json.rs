//! The JSON-lines form: readable, editable, loadable.

use crate::support::{every_kind, header, write_log};
use logchannel::{
    from_json_lines, to_json_lines, Entry, Event, JsonError, LogHeader, LogReader, LogWriter,
};

fn dump(entries: &[Entry]) -> String {
    let mut out = Vec::new();
    to_json_lines(&mut out, &header(), entries).expect("json");
    String::from_utf8(out).expect("utf-8")
}

fn load(text: &str) -> Result<(LogHeader, Vec<Entry>), JsonError> {
    let (h, entries) = from_json_lines(text.as_bytes())?;
    Ok((h, entries.collect::<Result<_, _>>()?))
}

#[test]
fn a_dump_is_one_line_per_entry_with_hex_bit_patterns() {
    let text = dump(&every_kind());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12);
    assert!(lines[0].starts_with(r#"{"format_version":1,"vm_id":"vm-test","guest_image_hash":""#));
    assert_eq!(
        lines[1],
        r#"{"seq":1,"pos":{"exits":1000,"rip":"0x102000"},"event":{"type":"rdtsc","value":"0x1a2b3c4d"}}"#
    );
    // 64-bit random values survive tools that read numbers as doubles.
    assert!(
        lines[3].contains(r#""value":"0x9e3779b97f4a7c15""#),
        "{}",
        lines[3]
    );
    assert!(
        lines[9].contains(r#""type":"digest","reason":"transmit""#),
        "{}",
        lines[9]
    );
    assert!(
        lines[9].contains(r#""output_hash":"0x5555""#),
        "{}",
        lines[9]
    );
    assert!(lines[8].contains(r#""frame":"000102"#), "{}", lines[8]);
}

#[test]
fn binary_to_json_to_binary_is_the_same_log() {
    let (bytes, _) = write_log(&every_kind());
    let reader = LogReader::new(&bytes[..]).expect("header");
    let h = reader.header().clone();
    let entries: Vec<Entry> = reader.collect::<Result<_, _>>().expect("entries");
    let mut text = Vec::new();
    to_json_lines(&mut text, &h, &entries).expect("json");

    let (h2, loaded) = from_json_lines(&text[..]).expect("header line");
    let mut w = LogWriter::new(Vec::new(), &h2).expect("header");
    let mut loaded = loaded;
    for e in loaded.by_ref() {
        w.append_entry(&e.expect("entry")).expect("append");
    }
    assert!(loaded.ended());
    assert_eq!(w.into_inner().expect("flush"), bytes);
}

#[test]
fn hand_edits_load() {
    let text = dump(&every_kind()[..1]);
    // Someone replaces the TSC with a decimal number and adds blank lines.
    let edited = text.replace(r#""value":"0x1a2b3c4d""#, r#""value":16"#) + "\n\n";
    let (_, entries) = load(&edited).expect("load");
    assert_eq!(entries[0].event, Event::Rdtsc { value: 16 });
    let edited = text.replace(r#""value":"0x1a2b3c4d""#, r#""value":"17""#);
    assert_eq!(
        load(&edited).expect("load").1[0].event,
        Event::Rdtsc { value: 17 }
    );
}

#[test]
fn json_errors_name_the_line() {
    let text = dump(&every_kind());
    let lines: Vec<&str> = text.lines().collect();

    assert!(matches!(load(""), Err(JsonError::MissingHeader)));
    assert!(matches!(load("\n  \n"), Err(JsonError::MissingHeader)));

    let future = text.replacen(r#""format_version":1"#, r#""format_version":7"#, 1);
    assert!(matches!(
        load(&future),
        Err(JsonError::UnsupportedVersion {
            line: 1,
            found: 7,
            supported: 1
        })
    ));

    // A deleted line is a gap.
    let gap = [lines[0], lines[1], lines[3]].join("\n");
    let err = load(&gap).expect_err("gap");
    assert!(matches!(
        err,
        JsonError::Sequence {
            line: 3,
            expected: 2,
            found: 3
        }
    ));
    assert_eq!(
        err.to_string(),
        "line 3: entry has sequence number 3, expected 2"
    );

    // A typo in a field name is not silently ignored.
    let typo = [lines[0], &lines[1].replace("\"value\"", "\"valeu\"")].join("\n");
    let err = load(&typo).expect_err("typo");
    assert!(
        matches!(&err, JsonError::Parse { line: 2, message } if message.contains("valeu")),
        "{err}"
    );

    // Out of range for the field.
    let big = [
        lines[0],
        &lines[7].replace("\"vector\":32", "\"vector\":256"),
    ]
    .join("\n");
    let err = load(&big).expect_err("range");
    assert!(matches!(err, JsonError::Parse { line: 2, .. }), "{err}");
    let big = [
        lines[0],
        &lines[6].replace("\"value\":\"0x12\"", "\"value\":\"0x1ff\""),
    ]
    .join("\n");
    let err = load(&big).expect_err("range");
    assert!(
        matches!(&err, JsonError::Parse { line: 2, message } if message.contains("does not fit")),
        "{err}"
    );

    // Bad packet hex.
    let bad = [
        lines[0],
        &lines[8].replace("\"frame\":\"00", "\"frame\":\"0g"),
    ]
    .join("\n");
    let err = load(&bad).expect_err("hex");
    assert!(
        matches!(&err, JsonError::Parse { line: 2, message } if message.contains("not a hex byte")),
        "{err}"
    );

    // Something after the End entry.
    let after = [
        text.trim_end(),
        &lines[1].replace("\"seq\":1", "\"seq\":12"),
    ]
    .join("\n");
    let err = load(&after).expect_err("after end");
    assert!(
        matches!(err, JsonError::AfterEnd { line: 13, seq: 12 }),
        "{err}"
    );

    // Not UTF-8.
    let mut raw = text.clone().into_bytes();
    raw.extend_from_slice(b"\xff\xfe\n");
    let (_, entries) = from_json_lines(&raw[..]).expect("header");
    let err = entries.filter_map(Result::err).next().expect("error");
    assert!(matches!(err, JsonError::Read { line: 13, .. }), "{err}");
}

#[test]
fn a_header_with_a_short_image_hash_is_refused() {
    let text = dump(&[]);
    let short = text.replacen(r#""guest_image_hash":""#, r#""guest_image_hash":"00"#, 1);
    // Two more hex digits: 33 bytes.
    let err = load(&short).expect_err("33 bytes");
    assert!(
        matches!(&err, JsonError::Parse { line: 1, message } if message.contains("wrong length: 33 bytes")),
        "{err}"
    );
}

#[test]
fn an_async_point_round_trips_through_a_log_and_json() {
    let point = Entry {
        seq: 1,
        pos: logchannel::Position {
            exits: 1402,
            rip: 0x10_4c8e,
        },
        event: Event::AsyncPoint {
            regs: 0xe8f8_e425_a5e0_d29a,
            mem: 0x0a0c_5f58_7579_1a11,
        },
    };
    assert_eq!(
        point.to_string(),
        "#1 @exit 1402 rip 0x104c8e  async-point regs 0xe8f8e425a5e0d29a mem 0xa0c5f5875791a11"
    );
    let text = dump(std::slice::from_ref(&point));
    assert!(
        text.lines().nth(1).is_some_and(|l| l.contains(
            r#""event":{"type":"async_point","regs":"0xe8f8e425a5e0d29a","mem":"0xa0c5f5875791a11"}"#
        )),
        "{text}"
    );
    let (_, loaded) = load(&text).expect("load");
    assert_eq!(loaded, vec![point.clone()]);
    let (bytes, _) = write_log(std::slice::from_ref(&point));
    let mut reader = LogReader::new(&bytes[..]).expect("reader");
    let read = reader.next().expect("an entry").expect("readable");
    assert_eq!(read, point);
}
