//! Test support: starts a real `warren server` process on free loopback
//! ports with its own data directory, and a minimal raw AMQP client for
//! tests that must send what no well-behaved client would.

#![allow(dead_code)]

pub mod clients;
pub mod cluster;

use bytes::BytesMut;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warren::amqp::frame::{self, Frame};
use warren::amqp::writer::encode_method;

/// A running `warren server`, killed when dropped.
pub struct Server {
    pub amqp: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts a server with extra flags and waits until it accepts AMQP
    /// connections (at most 30 s).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    /// Starts a server with extra flags and environment variables.
    ///
    /// Its ports are picked free and released before the server binds them,
    /// so another process on the machine (a parallel test's connection,
    /// its ephemeral port) may take one in between: a start that fails
    /// with "Address already in use" is tried again on other ports.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        for _ in 0..4 {
            match Server::try_start(extra, env) {
                Ok(server) => return server,
                Err(log) if log.iter().any(|l| l.contains("Address already in use")) => continue,
                Err(log) => panic!("warren exited early: {log:?}"),
            }
        }
        panic!("warren found its ports taken four times in a row");
    }

    /// One start; the log when the process exits before listening.
    fn try_start(extra: &[&str], env: &[(&str, &str)]) -> Result<Server, Vec<String>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let amqp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let cluster: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("server")
            .args(["--amqp-listen", &amqp.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--cluster-listen", &cluster.to_string()])
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args(extra)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("warren binary starts");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(amqp).is_ok() {
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                // Its stderr is closed: the reader ends with the last line.
                let _ = reader.join();
                return Err(log.lock().unwrap().clone());
            }
            assert!(
                Instant::now() < deadline,
                "warren did not start listening in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Server {
            amqp,
            admin,
            child,
            _dir: dir,
            log,
        })
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }

    /// Lines the server has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// An HTTP request to the admin API: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(self.admin, method, path, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- warren log ---\n{}", self.log().join("\n"));
        }
    }
}

/// One HTTP/1.1 request: (status, body); status 0 when nothing answers.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Connects with lapin.
pub async fn connect(server: &Server) -> lapin::Connection {
    lapin::Connection::connect(&server.uri(), lapin::ConnectionProperties::default())
        .await
        .expect("lapin connects")
}

/// The AMQP reply code inside a lapin error, if it is a protocol error.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

/// A raw AMQP client over a blocking socket, for protocol-level tests.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
}

/// What a raw client read.
#[derive(Debug)]
pub enum Got {
    Frame(Frame),
    /// The server closed the socket.
    Eof,
    /// Bytes that are not a frame (e.g. a protocol header).
    Bytes(Vec<u8>),
}

impl Raw {
    pub fn connect(server: &Server) -> Raw {
        let s = TcpStream::connect(server.amqp).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = self.s.write_all(bytes);
    }

    pub fn send_method(&mut self, channel: u16, m: &amq_protocol::protocol::AMQPClass) {
        let bytes = encode_method(channel, m);
        self.send(&bytes);
    }

    /// Reads the next frame (or EOF) within the socket timeout.
    pub fn recv(&mut self) -> Got {
        use std::io::Read;
        loop {
            if self.buf.starts_with(b"AMQP") && self.buf.len() >= 8 {
                return Got::Bytes(self.buf.split_to(8).to_vec());
            }
            match frame::decode(&mut self.buf, 1 << 24) {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e:?}"),
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return Got::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until a method frame arrives; heartbeats are skipped.
    pub fn recv_method(&mut self) -> Option<amq_protocol::protocol::AMQPClass> {
        loop {
            match self.recv() {
                Got::Frame(Frame::Method { method, .. }) => return Some(*method),
                Got::Frame(_) => continue,
                _ => return None,
            }
        }
    }

    /// Performs the handshake as guest with the given heartbeat and client
    /// capabilities (`connection.blocked` etc.).
    pub fn handshake(server: &Server, heartbeat: u16, caps: &[&str]) -> Raw {
        use amq_protocol::protocol::{AMQPClass, connection as c};
        use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
        let mut r = Raw::connect(server);
        r.send(frame::PROTOCOL_HEADER);
        let Some(AMQPClass::Connection(c::AMQPMethod::Start(_))) = r.recv_method() else {
            panic!("expected connection.start")
        };
        let mut capt = FieldTable::default();
        for cap in caps {
            capt.insert(ShortString::from(*cap), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        props.insert(
            ShortString::from("capabilities"),
            AMQPValue::FieldTable(capt),
        );
        r.send_method(
            0,
            &AMQPClass::Connection(c::AMQPMethod::StartOk(c::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(b"\0guest\0guest".to_vec()),
                locale: "en_US".into(),
            })),
        );
        let Some(AMQPClass::Connection(c::AMQPMethod::Tune(t))) = r.recv_method() else {
            panic!("expected connection.tune")
        };
        r.send_method(
            0,
            &AMQPClass::Connection(c::AMQPMethod::TuneOk(c::TuneOk {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat,
            })),
        );
        r.send_method(
            0,
            &AMQPClass::Connection(c::AMQPMethod::Open(c::Open {
                virtual_host: "/".into(),
            })),
        );
        let Some(AMQPClass::Connection(c::AMQPMethod::OpenOk(_))) = r.recv_method() else {
            panic!("expected connection.open-ok")
        };
        r
    }

    pub fn open_channel(&mut self, ch: u16) {
        use amq_protocol::protocol::{AMQPClass, channel as c};
        self.send_method(ch, &AMQPClass::Channel(c::AMQPMethod::Open(c::Open {})));
        let Some(AMQPClass::Channel(c::AMQPMethod::OpenOk(_))) = self.recv_method() else {
            panic!("expected channel.open-ok")
        };
    }

    /// Reads until connection.close arrives; returns its reply code, and
    /// answers close-ok.
    pub fn expect_connection_close(&mut self) -> u16 {
        use amq_protocol::protocol::{AMQPClass, connection as c};
        loop {
            match self.recv_method() {
                Some(AMQPClass::Connection(c::AMQPMethod::Close(cl))) => {
                    self.send_method(
                        0,
                        &AMQPClass::Connection(c::AMQPMethod::CloseOk(c::CloseOk {})),
                    );
                    return cl.reply_code;
                }
                Some(_) => continue,
                None => panic!("connection ended without connection.close"),
            }
        }
    }

    /// Reads until channel.close arrives; returns its reply code.
    /// Closes a channel normally and checks that the server confirms it.
    pub fn close_channel(&mut self, channel: u16) {
        use amq_protocol::protocol::{AMQPClass, channel as c};
        self.send_method(
            channel,
            &AMQPClass::Channel(c::AMQPMethod::Close(c::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        assert!(matches!(
            self.recv_method(),
            Some(AMQPClass::Channel(c::AMQPMethod::CloseOk(_)))
        ));
    }

    pub fn expect_channel_close(&mut self) -> u16 {
        use amq_protocol::protocol::{AMQPClass, channel as c};
        loop {
            match self.recv_method() {
                Some(AMQPClass::Channel(c::AMQPMethod::Close(cl))) => return cl.reply_code,
                Some(_) => continue,
                None => panic!("connection ended without channel.close"),
            }
        }
    }
}
