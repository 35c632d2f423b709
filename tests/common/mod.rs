//! Shared test helpers: a loopback HTTP/1.1 server for tests of network clients, and
//! [`output_text`] for child processes. The server listens on 127.0.0.1 only,
//! speaks just enough HTTP (one request per connection, `Content-Length` bodies,
//! `Connection: close`), counts and records requests, and lets a handler choose each reply:
//! a response, a stall (accept, read the request, never answer) or an abrupt close.
//! Every loop is bounded; dropping the server stops and joins all its threads.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a stalled connection is held at most (the client should time out well before).
pub const STALL_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("request body is JSON")
    }

    /// `messages[0].content` of a chat-completions request.
    pub fn prompt(&self) -> String {
        self.json()["messages"][0]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub enum Reply {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// A response with a binary body.
    Bytes {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Read the request and never answer (until the server stops or STALL_LIMIT passes).
    Stall,
    /// Read the request and close the connection without a response.
    Close,
}

impl Reply {
    pub fn status(status: u16, body: &str) -> Reply {
        Reply::Respond {
            status,
            headers: vec![],
            body: body.to_string(),
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Reply {
        match self {
            Reply::Respond {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.to_string(), value.to_string()));
                Reply::Respond {
                    status,
                    headers,
                    body,
                }
            }
            Reply::Bytes {
                status,
                mut headers,
                body,
            } => {
                headers.push((name.to_string(), value.to_string()));
                Reply::Bytes {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }

    /// A 200 chat-completions response whose message content is `content`.
    pub fn chat(content: &str) -> Reply {
        let body = serde_json::json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "judge-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        });
        Reply::status(200, &body.to_string()).with_header("Content-Type", "application/json")
    }
}

type Handler = dyn Fn(usize, &Request) -> Reply + Send + Sync;

pub struct LoopbackServer {
    addr: std::net::SocketAddr,
    count: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    conn_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl LoopbackServer {
    /// Start a server; `handler(n, request)` chooses the reply to the n-th request (0-based).
    pub fn start(handler: impl Fn(usize, &Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        let count = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let conn_threads = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let accept_thread = {
            let (count, requests, stop, conn_threads) = (
                count.clone(),
                requests.clone(),
                stop.clone(),
                conn_threads.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (count, requests, stop, handler) = (
                                count.clone(),
                                requests.clone(),
                                stop.clone(),
                                handler.clone(),
                            );
                            let h = std::thread::spawn(move || {
                                serve(stream, &count, &requests, &stop, &*handler);
                            });
                            conn_threads.lock().unwrap().push(h);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            addr,
            count,
            requests,
            stop,
            accept_thread: Some(accept_thread),
            conn_threads,
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT`
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Complete requests received so far.
    pub fn request_count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept_thread.take() {
            h.join().ok();
        }
        let handles: Vec<_> = std::mem::take(&mut *self.conn_threads.lock().unwrap());
        for h in handles {
            h.join().ok();
        }
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    for _ in 0..200 {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(Some(0), |(_, v)| v.parse().ok())?;
    let mut body = vec![0u8; len.min(16 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn serve(
    mut stream: TcpStream,
    count: &AtomicUsize,
    requests: &Mutex<Vec<Request>>,
    stop: &AtomicBool,
    handler: &Handler,
) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let Some(req) = read_request(&stream) else {
        return;
    };
    let n = count.fetch_add(1, Ordering::SeqCst);
    requests.lock().unwrap().push(req.clone());
    let reply = match handler(n, &req) {
        Reply::Respond {
            status,
            headers,
            body,
        } => Reply::Bytes {
            status,
            headers,
            body: body.into_bytes(),
        },
        other => other,
    };
    match reply {
        Reply::Respond { .. } => unreachable!("converted above"),
        Reply::Bytes {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                reason(status),
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).ok();
            stream.write_all(&body).ok();
            stream.flush().ok();
        }
        Reply::Stall => {
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < STALL_LIMIT {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Reply::Close => {}
    }
}

/// A child process's stdout and stderr as one text, for assertions and their messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
