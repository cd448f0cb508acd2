//! The QUIC link and listener in one process over 127.0.0.1, each driven by its own
//! thread's loop: messages both ways in both modes, the datagram size floor, trust by CA file and by fingerprint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inagg_quic::{ClientOptions, Identity, Mode, QuicLink, QuicListener, Trust, MIN_DATAGRAM};

fn temp(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let p = std::env::temp_dir().join(format!("inagg-quic-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&p).expect("dir");
    p
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Runs `listener` on a thread of its own, echoing every message to its sender, until
/// `stop` is set or `limit` passes (a bound on the test, not a speed asked for); its
/// loop is what drives QUIC for the listener's side.
fn echo(
    mut listener: QuicListener,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut got = Vec::new();
            listener
                .recv(Duration::from_millis(20), |from, m| {
                    got.push((from, m.to_vec()))
                })
                .expect("recv");
            for (from, m) in &got {
                listener.send(*from, m);
            }
            listener.flush().expect("flush");
        }
        listener.close();
    })
}

/// Receives `want` messages on `link` within `limit`; returns them, sorted.
fn receive(link: &mut QuicLink, want: usize, limit: Duration) -> Vec<Vec<u8>> {
    let mut back = Vec::new();
    let deadline = Instant::now() + limit;
    while back.len() < want && Instant::now() < deadline {
        link.recv(Duration::from_millis(20), |m| back.push(m.to_vec()))
            .expect("recv");
    }
    back.sort_unstable();
    back
}

#[test]
fn messages_travel_both_ways_in_both_modes() {
    let dir = temp("both");
    let id = Identity::load_or_generate(&dir.join("c.pem"), &dir.join("k.pem")).expect("id");
    assert!(id.generated);
    let listener = QuicListener::bind(any(), &id).expect("bind");
    let at = listener.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(30);
    let echoer = echo(listener, Arc::clone(&stop), 2 * limit);
    for (mode, trust) in [
        (Mode::Stream, Trust::Ca(id.cert_path.clone())),
        (
            Mode::Datagram,
            Trust::fingerprint(&id.fingerprint()).expect("fp"),
        ),
    ] {
        let mut o = ClientOptions::new(trust);
        o.mode = mode;
        let mut link = QuicLink::connect(&o, at, any()).expect("connect");
        assert!(
            link.max_message() >= MIN_DATAGRAM,
            "{mode:?}: {}",
            link.max_message()
        );
        // Messages whose every byte differs from its neighbours' and from the other
        // messages' bytes at the same place: a byte lost, moved or mixed shows.
        let message = |i: usize, n: usize| -> Vec<u8> {
            (0..n)
                .map(|k| (k.wrapping_mul(31) ^ (i * 97 + 13)) as u8)
                .collect()
        };
        let sizes = [1usize, 40, 1000, MIN_DATAGRAM];
        let mut sent: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| message(i, *n))
            .collect();
        for m in &sent {
            link.send(m).expect("send");
        }
        sent.sort_unstable();
        // Datagrams may be lost in principle; on loopback with room in every buffer
        // they are not.
        assert_eq!(
            receive(&mut link, sizes.len(), limit),
            sent,
            "{mode:?}: echoed"
        );
        if mode == Mode::Stream {
            // A stream takes messages larger than any datagram, up to the largest inagg
            // message (65,507 bytes, as over UDP).
            assert_eq!(link.max_message(), inagg_proto::wire::MAX_DATAGRAM);
            let large = vec![message(9, 60_000)];
            link.send(&large[0]).expect("send");
            assert_eq!(receive(&mut link, 1, limit), large, "echoed");
        } else {
            let err = link.send(&vec![7u8; 20_000]).expect_err("too large");
            assert!(err.to_string().contains("does not fit"), "{err}");
        }
        link.close();
    }
    stop.store(true, Ordering::Relaxed);
    echoer.join().expect("listener");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_identity_is_kept_and_half_of_one_is_refused() {
    let dir = temp("keep");
    let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
    let a = Identity::load_or_generate(&c, &k).expect("new");
    let b = Identity::load_or_generate(&c, &k).expect("load");
    assert!(a.generated && !b.generated);
    assert_eq!(a.fingerprint(), b.fingerprint());
    std::fs::remove_file(&k).expect("rm");
    let err = Identity::load_or_generate(&c, &k).expect_err("half");
    assert!(err.to_string().contains("does not: refusing"), "{err}");
    assert!(Trust::fingerprint("abc").is_err());
    let fp = a.fingerprint();
    let colons: Vec<String> = fp
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect();
    assert_eq!(
        Trust::fingerprint(&format!("sha256:{}", colons.join(":"))).expect("colons"),
        Trust::fingerprint(&fp).expect("plain")
    );
    let _ = std::fs::remove_dir_all(dir);
}
