//! The real server on loopback, driven through the client library and raw
//! sockets. Every test runs under a deadline, and every socket has a
//! timeout.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use arbiter::cli::{run, ArbiterArgs};
use arbiter::{
    ArbiterClient, ArbiterError, ErrorKind, LossReason, Server, ServerConfig, ServerHandle,
    StoreError, TasOutcome, View, STATE_FILE,
};
use clap::Parser;
use common::{lost_to, member, pair, random_history, random_seed, view, within};
use rand::Rng;
use serde_json::Value;

const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn start(dir: &Path) -> ServerHandle {
    start_with(ServerConfig::new(dir))
}

fn start_with(config: ServerConfig) -> ServerHandle {
    Server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .expect("server binds")
        .spawn()
        .expect("server starts")
}

fn client(server: &ServerHandle) -> ArbiterClient {
    ArbiterClient::with_timeout(server.local_addr(), IO_TIMEOUT)
}

#[test]
fn decisions_survive_a_restart() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
        let first = start(dir.path());
        let c = client(&first);
        pair(&c, "vm", &a, &b);
        pair(&c, "other", &b, &a);
        assert!(c.test_and_set("vm", 2, &b).unwrap().won());
        assert_eq!(c.ping("vm", &b, 3).unwrap(), view(3, &b, None));
        first.stop().unwrap();
        let result = c.query("vm");
        assert!(
            matches!(result, Err(ArbiterError::Unreachable { .. })),
            "{result:?}"
        );

        let second = start(dir.path());
        let c = client(&second);
        assert_eq!(c.query("vm").unwrap(), view(3, &b, None));
        assert_eq!(c.query("other").unwrap(), view(2, &b, Some(&a)));
        assert!(lost_to(&c.test_and_set("vm", 2, &a).unwrap(), &b));
        assert_eq!(
            c.test_and_set("vm", 2, &b).unwrap(),
            TasOutcome::Won {
                view: view(3, &b, None)
            }
        );
        // b's acknowledgement of view 3 was kept: a spare is named at once,
        // and view numbers carry on.
        assert_eq!(c.ping("vm", &s, 0).unwrap(), view(4, &b, Some(&s)));
        assert!(c.test_and_set("other", 2, &a).unwrap().won());
        second.stop().unwrap();

        let third = start(dir.path());
        let c = client(&third);
        assert_eq!(c.query("vm").unwrap(), view(4, &b, Some(&s)));
        assert!(lost_to(&c.test_and_set("other", 2, &b).unwrap(), &a));
        third.stop().unwrap();
    })
}

#[test]
fn unsaved_decision_is_not_made() {
    within(Duration::from_secs(20), || {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let server = start(&dir);
        let c = client(&server);
        let (a, b) = (member("a", 1), member("b", 2));
        assert_eq!(c.ping("vm", &a, 0).unwrap(), view(1, &a, None));
        std::fs::remove_dir_all(&dir).unwrap();
        match c.test_and_set("vm", 1, &a) {
            Err(ArbiterError::Rejected {
                kind: ErrorKind::Storage,
                message,
                ..
            }) => assert!(message.contains("did not make it"), "{message}"),
            other => panic!("expected a storage error, got {other:?}"),
        }
        assert!(
            c.ping("vm", &b, 0).is_ok(),
            "pings that decide nothing go on"
        );
        match c.ping("vm", &a, 1) {
            Err(ArbiterError::Rejected {
                kind: ErrorKind::Storage,
                ..
            }) => {}
            other => panic!("an acknowledgement is a decision too: {other:?}"),
        }
        assert_eq!(c.query("vm").unwrap(), view(1, &a, None));
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            c.test_and_set("vm", 1, &a).unwrap(),
            TasOutcome::Won {
                view: view(2, &a, None)
            }
        );
        server.stop().unwrap();
    })
}

#[test]
fn corrupt_state_is_refused_by_name() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, "{\"format\": 1, \"vms\": {\"vm\": {\"view\": 3}}}").unwrap();
        let err = Server::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerConfig::new(dir.path()),
        )
        .err()
        .expect("a corrupt state file is an error");
        let message = err.to_string();
        assert!(
            matches!(&err, ArbiterError::State(StoreError::Corrupt { path: p, .. }) if *p == path),
            "{err:?}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("invalid type"), "{message}");
        // Nothing was reset.
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"view\": 3"));
    })
}

#[test]
fn second_arbiter_on_one_directory_is_refused() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let first = start(dir.path());
        let err = Server::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerConfig::new(dir.path()),
        )
        .err()
        .expect("the directory is locked");
        assert!(
            matches!(err, ArbiterError::State(StoreError::Locked { .. })),
            "{err:?}"
        );
        first.stop().unwrap();
    })
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn unreachable_arbiter_is_a_distinct_error() {
    within(Duration::from_secs(20), || {
        let me = member("a", 1);
        // Nothing listens.
        let c = ArbiterClient::with_timeout(free_port(), Duration::from_millis(300));
        let err = c.test_and_set("vm", 1, &me).unwrap_err();
        assert!(matches!(err, ArbiterError::Unreachable { .. }), "{err:?}");
        // Something listens but never answers: the read times out.
        let mute = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = ArbiterClient::with_timeout(mute.local_addr().unwrap(), Duration::from_millis(300));
        let started = Instant::now();
        let err = c.test_and_set("vm", 1, &me).unwrap_err();
        assert!(matches!(err, ArbiterError::Unreachable { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(mute);
    })
}

struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let writer = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        writer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        writer.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Raw {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Value {
        self.writer.write_all(bytes).unwrap();
        self.receive()
    }

    fn receive(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    /// The server closed the connection. Closing with our bytes unread
    /// makes its kernel reset the connection, which is a close too.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn error_of(response: &Value) -> (&str, &str) {
    (
        response["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("no kind: {response}")),
        response["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {response}")),
    )
}

#[test]
fn bad_requests_get_error_responses() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let mut raw = Raw::connect(server.local_addr());
        let query = b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\n";
        let empty =
            serde_json::json!({"ok": {"view": {"number": 0, "primary": null, "backup": null}}});
        assert_eq!(raw.send(query), empty);

        let r = raw.send(b"{\"version\":2,\"op\":\"query\",\"vm\":\"vm\"}\n");
        let (kind, text) = error_of(&r);
        assert_eq!(kind, "version");
        assert!(
            text.contains("version 2") && text.contains("version 1"),
            "{text}"
        );
        let r = raw.send(b"{\"version\":1,\"op\":\"query\",\"vm\":\n");
        assert_eq!(error_of(&r).0, "malformed");
        let r = raw.send(b"\xff\xfe\n");
        assert_eq!(error_of(&r).0, "malformed");
        let r = raw.send(b"\n");
        assert_eq!(error_of(&r).0, "malformed");
        let r = raw.send(b"{\"version\":1,\"op\":\"ping\",\"vm\":\"vm\",\"me\":{\"id\":\"a\"},\"view_known\":0}\n");
        let (kind, text) = error_of(&r);
        assert_eq!(kind, "malformed");
        assert!(text.contains("service_addr"), "{text}");
        // The same connection still serves, CRLF included.
        assert_eq!(
            raw.send(b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\r\n"),
            empty
        );
        // Two requests in one write get two responses, in order.
        raw.writer.write_all(b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\n{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\n").unwrap();
        assert_eq!(raw.receive(), empty);
        assert_eq!(raw.receive(), empty);

        // An endless line is cut off, and that connection closed.
        let long = vec![b' '; arbiter::MAX_LINE + 10];
        raw.writer.write_all(&long).unwrap();
        let r = raw.receive();
        assert_eq!(error_of(&r).0, "too_long");
        assert!(raw.closed());

        // Other connections are unaffected.
        let mut again = Raw::connect(server.local_addr());
        assert_eq!(again.send(query), empty);
        assert_eq!(client(&server).query("vm").unwrap(), View::default());
        server.stop().unwrap();
    })
}

#[test]
fn the_idlest_connection_makes_room_at_the_limit() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start_with(ServerConfig {
            max_connections: 2,
            ..ServerConfig::new(dir.path())
        });
        let query = b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\n";
        let mut first = Raw::connect(server.local_addr());
        let mut second = Raw::connect(server.local_addr());
        // The server marks a connection idle a moment after the response
        // reaches the client; the pauses order the two for certain.
        assert!(first.send(query).get("ok").is_some());
        thread::sleep(Duration::from_millis(100));
        assert!(second.send(query).get("ok").is_some());
        thread::sleep(Duration::from_millis(100));
        // first has gone longest without a request: it is closed, and told
        // why, to serve the third.
        let mut third = Raw::connect(server.local_addr());
        assert!(third.send(query).get("ok").is_some());
        let r = first.receive();
        let (kind, text) = error_of(&r);
        assert_eq!(kind, "busy");
        assert!(text.contains("without a request"), "{text}");
        assert!(first.closed());
        assert!(second.send(query).get("ok").is_some());
        assert!(third.send(query).get("ok").is_some());
        server.stop().unwrap();
    })
}

/// Issue 9: 64 connections that never send held every slot for the 60 s
/// idle timeout, and everyone else was answered `busy`.
#[test]
fn silent_connections_do_not_starve_clients() {
    within(Duration::from_secs(30), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let started = Instant::now();
        let mut silent: Vec<Raw> = (0..ServerConfig::DEFAULT_MAX_CONNECTIONS * 2)
            .map(|_| Raw::connect(server.local_addr()))
            .collect();
        let c = client(&server);
        let a = member("a", 1);
        for _ in 0..20 {
            assert_eq!(c.query("vm").unwrap(), View::default());
        }
        assert_eq!(c.ping("vm", &a, 0).unwrap(), view(1, &a, None));
        // Served by making room, not by waiting for the idle timeout.
        assert!(
            started.elapsed() < ServerConfig::DEFAULT_IDLE_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        // The oldest silent one was told why it was closed.
        let r = silent[0].receive();
        assert_eq!(error_of(&r).0, "busy");
        assert!(silent[0].closed());
        silent.clear();
        server.stop().unwrap();
    })
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let args = Command::parse_from([
            "ftvm-arbiter",
            "--state",
            &dir.path().display().to_string(),
            "--idle-timeout-ms",
            "300",
        ])
        .arbiter;
        assert_eq!(args.config().idle_timeout, Duration::from_millis(300));
        let server = start_with(args.config());
        let started = Instant::now();
        let mut silent = Raw::connect(server.local_addr());
        // Bytes without a whole request do not keep a connection open.
        let mut trickling = Raw::connect(server.local_addr());
        let query = b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}";
        for byte in query.iter().take(10) {
            if trickling.writer.write_all(&[*byte]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        assert!(silent.closed());
        assert!(trickling.closed());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
        // A connection that keeps sending requests stays open.
        let mut busy = Raw::connect(server.local_addr());
        for _ in 0..8 {
            let mut line = query.to_vec();
            line.push(b'\n');
            assert!(busy.send(&line).get("ok").is_some());
            thread::sleep(Duration::from_millis(100));
        }
        server.stop().unwrap();
    })
}

#[test]
fn zero_limits_are_refused_on_the_command_line() {
    within(Duration::from_secs(20), || {
        for flag in [
            "--max-connections",
            "--ping-interval-ms",
            "--dead-pings",
            "--idle-timeout-ms",
        ] {
            let err = Command::try_parse_from(["ftvm-arbiter", "--state", "/tmp/x", flag, "0"])
                .err()
                .unwrap_or_else(|| panic!("{flag} 0 was accepted"));
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
            // The exit status of every other malformed argument.
            assert_eq!(err.exit_code(), 2);
            let text = err.to_string();
            assert!(text.contains(flag) && text.contains("at least 1"), "{text}");
        }
        let args = Command::try_parse_from([
            "ftvm-arbiter",
            "--state",
            "/tmp/x",
            "--max-connections",
            "1",
            "--ping-interval-ms",
            "1",
        ])
        .unwrap()
        .arbiter;
        assert_eq!(args.config().max_connections, 1);
    })
}

/// `ftvm arbiter` says "listening on ..." once [`arbiter::cli::bind`]
/// returned: every failure comes from that call, before anything is
/// served or announced, and what it names is the real address.
#[test]
fn bind_fails_before_anything_is_announced() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let args = |listen: SocketAddr, state: &Path| {
            Command::parse_from([
                "ftvm-arbiter",
                "--listen",
                &listen.to_string(),
                "--state",
                &state.display().to_string(),
            ])
            .arbiter
        };
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        // A state "directory" that is a file.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = arbiter::cli::bind(&args(any_port, &file))
            .err()
            .expect("a file");
        assert!(
            matches!(err, ArbiterError::State(StoreError::Io { .. })),
            "{err:?}"
        );
        // An address in use.
        let taken = TcpListener::bind(any_port).unwrap();
        let state = dir.path().join("state");
        let err = arbiter::cli::bind(&args(taken.local_addr().unwrap(), &state))
            .err()
            .expect("the address is taken");
        assert!(matches!(err, ArbiterError::Listen { .. }), "{err:?}");
        // The failed bind released the state directory; the server names
        // the port it got.
        let server = arbiter::cli::bind(&args(any_port, &state)).unwrap();
        assert_ne!(server.local_addr().port(), 0);
        let err = arbiter::cli::bind(&args(any_port, &state))
            .err()
            .expect("locked");
        assert!(
            matches!(err, ArbiterError::State(StoreError::Locked { .. })),
            "{err:?}"
        );
        let handle = server.spawn().unwrap();
        assert_eq!(client(&handle).query("vm").unwrap(), View::default());
        handle.stop().unwrap();
        drop(taken);
    })
}

#[test]
fn duplicate_keys_are_malformed() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let mut raw = Raw::connect(server.local_addr());
        for line in [
            &b"{\"version\":1,\"op\":\"ping\",\"vm\":\"vm\",\"vm\":\"other\",\"me\":{\"id\":\"a\",\"service_addr\":\"127.0.0.1:5000\"},\"view_known\":0}\n"[..],
            b"{\"version\":1,\"op\":\"ping\",\"vm\":\"vm\",\"me\":{\"id\":\"a\",\"id\":\"b\",\"service_addr\":\"127.0.0.1:5000\"},\"view_known\":0}\n",
            b"{\"version\":1,\"op\":\"test_and_set\",\"op\":\"ping\",\"vm\":\"vm\",\"view\":0,\"claimant\":{\"id\":\"a\",\"service_addr\":\"127.0.0.1:5000\"}}\n",
        ] {
            let r = raw.send(line);
            let (kind, text) = error_of(&r);
            assert_eq!(kind, "malformed");
            assert!(text.contains("duplicate key"), "{text}");
        }
        // Nothing was registered, and the connection still serves.
        let c = client(&server);
        assert_eq!(c.query("vm").unwrap(), View::default());
        assert_eq!(c.query("other").unwrap(), View::default());
        let r = raw.send(b"{\"version\":1,\"op\":\"query\",\"vm\":\"vm\"}\n");
        assert!(r.get("ok").is_some(), "{r}");
        server.stop().unwrap();
    })
}

/// Issue 12, after a restart: the arbiter has forgotten who lost, but not
/// which view was won, so a displaced member resumed after a freeze and
/// pinging with the number it knew is still not named backup.
#[test]
fn a_restarted_arbiter_still_tells_a_resumed_loser_by_its_number() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let c = client(&server);
        let (a, b, s) = (member("a", 1), member("b", 2), member("s", 3));
        pair(&c, "vm", &a, &b);
        assert!(c.test_and_set("vm", 2, &b).unwrap().won());
        assert_eq!(c.ping("vm", &b, 3).unwrap(), view(3, &b, None));
        server.stop().unwrap();
        let server = start(dir.path());
        let c = client(&server);
        assert_eq!(c.ping("vm", &a, 2).unwrap(), view(3, &b, None));
        assert_eq!(c.ping("vm", &b, 3).unwrap(), view(3, &b, None));
        // A real spare started afterwards is named.
        assert_eq!(c.ping("vm", &s, 0).unwrap(), view(4, &b, Some(&s)));
        server.stop().unwrap();
    })
}

/// `ArbiterClient::ping_seen` is the wire's `backup_ready: false`, and a
/// ping without the field vouches for the backup.
#[test]
fn backup_ready_on_the_wire() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let c = client(&server);
        let (a, b) = (member("a", 1), member("b", 2));
        c.ping("vm", &a, 0).unwrap();
        c.ping("vm", &b, 0).unwrap();
        assert_eq!(c.ping("vm", &a, 1).unwrap(), view(2, &a, Some(&b)));
        let mut raw = Raw::connect(server.local_addr());
        let ping = |ready: &str| {
            format!(
                "{{\"version\":1,\"op\":\"ping\",\"vm\":\"vm\",\"me\":{{\"id\":\"a\",\"service_addr\":\"127.0.0.1:1\",\"log_addr\":\"127.0.0.1:1001\"}},\"view_known\":2{ready}}}\n"
            )
        };
        let r = raw.send(ping(",\"backup_ready\":false").as_bytes());
        assert_eq!(
            serde_json::from_value::<View>(r["ok"]["view"].clone()).unwrap(),
            view(2, &a, Some(&b))
        );
        assert!(matches!(
            c.test_and_set("vm", 2, &b).unwrap(),
            TasOutcome::Lost {
                reason: LossReason::Unacknowledged,
                ..
            }
        ));
        let r = raw.send(ping("").as_bytes());
        assert_eq!(
            serde_json::from_value::<View>(r["ok"]["view"].clone()).unwrap(),
            view(2, &a, Some(&b))
        );
        // Vouched for, b may win the view.
        assert!(c.test_and_set("vm", 2, &b).unwrap().won());
        server.stop().unwrap();
    })
}

#[derive(Parser)]
struct Command {
    #[command(flatten)]
    arbiter: ArbiterArgs,
}

#[test]
fn run_serves_until_the_stop_flag() {
    within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let listen = free_port();
        let args = Command::parse_from([
            "ftvm-arbiter",
            "--listen",
            &listen.to_string(),
            "--state",
            &dir.path().display().to_string(),
            "--ping-interval-ms",
            "20",
        ])
        .arbiter;
        assert_eq!(args.config().spare_timeout, Duration::from_millis(100));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (args, stop) = (args.clone(), Arc::clone(&stop));
            thread::spawn(move || run(&args, stop))
        };
        let c = ArbiterClient::with_timeout(listen, Duration::from_millis(300));
        let a = member("a", 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = loop {
            match c.ping("vm", &a, 0) {
                Ok(v) => break v,
                Err(ArbiterError::Unreachable { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("arbiter never came up: {e}"),
            }
        };
        assert_eq!(first, view(1, &a, None));
        // An open, idle connection does not hold the server up.
        let _idle = Raw::connect(listen);
        stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.is_finished() {
            assert!(Instant::now() < deadline, "run did not return after stop");
            thread::sleep(Duration::from_millis(10));
        }
        server.join().unwrap().unwrap();
        let result = c.query("vm");
        assert!(
            matches!(result, Err(ArbiterError::Unreachable { .. })),
            "{result:?}"
        );
        // The state directory was released and kept the view.
        let again = start(dir.path());
        assert_eq!(client(&again).query("vm").unwrap(), view(1, &a, None));
        again.stop().unwrap();
    })
}

/// The random histories of the rule suite (tests/rules.rs), with the
/// server restarted now and then: what it keeps on disk is enough to go on
/// by the rules.
#[test]
fn random_histories_survive_restarts() {
    let seed = random_seed();
    within(Duration::from_secs(60), move || {
        for round in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let mut server = Some(start(dir.path()));
            let mut restarts = 0;
            random_history("vm", seed.wrapping_add(round), &mut |rng| {
                if rng.random_ratio(1, 60) {
                    if let Some(old) = server.take() {
                        old.stop().unwrap();
                    }
                    restarts += 1;
                }
                let running = server.get_or_insert_with(|| start(dir.path()));
                Arc::new(client(running))
            });
            println!("round {round}: {restarts} restarts");
        }
    })
}

/// The README's example session, sent byte for byte to a fresh server,
/// gets the answers the README shows.
#[test]
fn the_readme_example_session_is_what_the_server_says() {
    within(Duration::from_secs(20), || {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let session = readme
            .split("### Example session")
            .nth(1)
            .and_then(|rest| rest.split("```\n").nth(1))
            .expect("the README has an example session");
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let mut raw = Raw::connect(server.local_addr());
        let mut exchanges = 0;
        let mut lines = session.lines();
        while let Some(sent) = lines.next() {
            let sent = sent.strip_prefix("> ").expect("a request line");
            let expected = lines
                .next()
                .and_then(|l| l.strip_prefix("< "))
                .expect("a response line");
            raw.writer
                .write_all(format!("{sent}\n").as_bytes())
                .unwrap();
            let mut got = String::new();
            raw.reader.read_line(&mut got).unwrap();
            assert_eq!(got, format!("{expected}\n"), "answer to {sent}");
            exchanges += 1;
        }
        assert!(exchanges >= 10, "{exchanges}");
        server.stop().unwrap();
    })
}
