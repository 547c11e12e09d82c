//! A TCP proxy that loses answers on purpose: it forwards a connection's
//! bytes both ways until told to lose the reply to the next request that
//! contains a given text. That request reaches the server and runs; its
//! answer never reaches the client, whose connection is closed instead, as
//! when a network drops between the two.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// A loopback proxy in front of one server port.
pub struct LossyProxy {
    pub port: u16,
    armed: Arc<Mutex<Option<String>>>,
    lost: Arc<Mutex<u32>>,
}

impl LossyProxy {
    /// Forwards connections on a fresh port to `127.0.0.1:target`.
    pub fn start(target: u16) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let lost = Arc::new(Mutex::new(0));
        let (a, l) = (armed.clone(), lost.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                relay(client, server, a.clone(), l.clone());
            }
        });
        LossyProxy { port, armed, lost }
    }

    /// The next request holding `needle` runs, but its answer is lost.
    pub fn lose_reply_to(&self, needle: &str) {
        *self.armed.lock().unwrap() = Some(needle.to_string());
    }

    /// Answers lost so far.
    pub fn lost(&self) -> u32 {
        *self.lost.lock().unwrap()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<Mutex<Option<String>>>,
    lost: Arc<Mutex<u32>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let swallow = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let sw = swallow.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut a = armed.lock().unwrap();
                let hit = a
                    .as_deref()
                    .is_some_and(|needle| String::from_utf8_lossy(&buf[..n]).contains(needle));
                if hit {
                    *a = None;
                    sw.store(true, Ordering::SeqCst);
                }
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Both);
    });
    let (mut s_in, mut c_out) = (server, client);
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match s_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if swallow.load(Ordering::SeqCst) {
                *lost.lock().unwrap() += 1;
                break;
            }
            if c_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = c_out.shutdown(Shutdown::Both);
        let _ = s_in.shutdown(Shutdown::Both);
    });
}
