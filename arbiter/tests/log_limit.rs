//! Issue 9: every malformed line was logged as a warning, 2.9 MB of log in
//! one test. This binary holds one test, because it installs the
//! process-wide log subscriber that captures what the server logs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::{Server, ServerConfig, WARNINGS_PER_SECOND};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

const LINES: u64 = 3000;

/// The number after "suppressed " in a summary line.
fn suppressed(line: &str) -> Option<u64> {
    let rest = &line[line.find("suppressed ")? + "suppressed ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn malformed_lines_are_logged_at_a_bounded_rate() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerConfig::new(dir.path()),
        )
        .unwrap()
        .spawn()
        .unwrap();
        let stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let started = Instant::now();
        // In batches, so that neither side's buffers fill while the other
        // waits.
        let mut line = String::new();
        for _ in 0..LINES / 100 {
            writer.write_all(&b"garbage\n".repeat(100)).unwrap();
            for _ in 0..100 {
                line.clear();
                reader.read_line(&mut line).unwrap();
                assert!(line.contains("\"malformed\""), "{line}");
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        // A summary comes once its second is over, without another warning.
        thread::sleep(Duration::from_millis(1500));
        let before_stop = captured.lines();
        server.stop().unwrap();
        done.send((seconds, before_stop, captured.lines())).unwrap();
    });
    let (seconds, before_stop, lines) = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the test finished within 60 s");
    let warned = lines
        .iter()
        .filter(|l| l.contains("malformed request"))
        .count() as u64;
    let summaries: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("malformed lines"))
        .filter_map(|l| suppressed(l))
        .collect();
    println!(
        "{seconds:.2} s: {warned} warnings, summaries {summaries:?}, {} log lines",
        lines.len()
    );
    let seconds_begun = seconds.ceil() as u64 + 1;
    assert!(
        warned <= u64::from(WARNINGS_PER_SECOND) * seconds_begun,
        "{warned} warnings in {seconds:.2} s"
    );
    // Every line is accounted for: logged, or counted in a summary.
    assert_eq!(warned + summaries.iter().sum::<u64>(), LINES);
    assert!(
        before_stop.iter().any(|l| l.contains("malformed lines")),
        "no summary within 1.5 s of the flood: {before_stop:?}"
    );
}
