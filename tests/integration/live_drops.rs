//! The progress line on a terminal shows frames lost while they are lost, not only in the
//! summary: here during a store outage with a full spool, when the upload stalls and the
//! writers drop.

use std::{
    io::Read as _,
    os::fd::{FromRawFd as _, OwnedFd},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tapstream_testenv::{CORPUS_RING_SIZE, CorpusFrame, Garage, Sender, VethPair, unique_name};

use crate::{
    common::tapstream_bin,
    upload::{random_frames, s3_args},
};

/// A pseudo-terminal: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: both out-pointers are valid; no name, termios or window size is asked for.
    let rc = unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// The numbers before " dropped" in the progress lines printed so far.
fn dropped_counts(terminal: &str) -> Vec<u64> {
    terminal
        .split('\r')
        .filter_map(|line| line.trim().strip_suffix(" dropped"))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn the_progress_line_shows_drops_while_a_store_outage_stalls_the_upload() {
    let veth = VethPair::new(1);
    let mut garage = Garage::start_in(&veth.capture_ns);
    let sender = Sender::new(&veth);
    let spool = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/{}", garage.bucket, unique_name("drops"));
    // One chunk in memory and a spool that holds none: while the store is down, the upload
    // stalls as soon as the first part waits for it, and the writers must drop.
    let ring = CORPUS_RING_SIZE.to_string();
    let mut args = vec![
        "capture",
        "-i",
        &veth.capture_if,
        "--upload",
        &url,
        "--compression",
        "none",
        "--part-size",
        "5MiB",
        "--rotate-age",
        "1s",
        "--upload-queue",
        "1",
        "--spool-max",
        "1",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--duration",
        "300s",
        "--ring-size",
        &ring,
    ];
    let store_args = s3_args(&garage);
    args.extend(store_args.iter().map(String::as_str));
    let (master, slave) = pty();
    let mut child = veth
        .capture_ns
        .command(tapstream_bin())
        .args(&args)
        .envs(garage.aws_env())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start tapstream");
    let terminal = Arc::new(Mutex::new(String::new()));
    let reader = std::thread::spawn({
        let terminal = terminal.clone();
        move || {
            let mut master = std::fs::File::from(master);
            let mut buf = [0u8; 4096];
            // Ends with EIO once the process (the slave's only holder) has exited.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                terminal.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let screen = || terminal.lock().unwrap().clone();
    let ended = |child: &mut std::process::Child| child.try_wait().expect("wait tapstream").is_some();

    let deadline = Instant::now() + Duration::from_secs(60);
    while !screen().contains("capturing on") {
        assert!(!ended(&mut child) && Instant::now() < deadline, "the capture never started:\n{}", screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    garage.stop();
    // Traffic in bursts (7 MB each) until a progress line shows drops; the capture runs on
    // meanwhile (it has 300 s and the store is down).
    let burst: Vec<_> = random_frames(5_000, 7)
        .into_iter()
        .enumerate()
        .map(|(index, data)| CorpusFrame { file: "random".into(), index, data })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let live = loop {
        sender.send_all(&burst);
        std::thread::sleep(Duration::from_millis(500));
        if let Some(&dropped) = dropped_counts(&screen()).iter().find(|&&n| n > 0) {
            break dropped;
        }
        assert!(!ended(&mut child), "the capture ended before a progress line showed drops:\n{}", screen());
        assert!(
            Instant::now() < deadline,
            "no progress line showed drops while the store was down; the last lines:\n{}",
            screen().rsplit('\r').take(3).collect::<Vec<_>>().join("\n")
        );
    };
    assert!(!ended(&mut child), "the drops showed while the capture ran");

    // The store comes back; the capture is stopped and reports the drops it showed.
    garage.resume();
    // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut summary = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut summary).expect("read stdout");
    let status = child.wait().expect("wait tapstream");
    reader.join().unwrap();
    eprintln!("terminal:\n{}\nsummary:\n{summary}", screen());
    assert!(status.success(), "tapstream failed ({status})");
    let count = |prefix: &str| -> Option<u64> {
        summary
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|l| l.split(' ').next()?.parse().ok())
    };
    let in_writers = count("dropped: ").unwrap_or_else(|| panic!("the summary counts drops:\n{summary}"));
    // Chunks that found the spool full are lost there, and counted apart.
    let spool_full = count("lost: ").unwrap_or(0);
    assert!(
        in_writers + spool_full >= live,
        "the summary's {in_writers} drops in the writers and {spool_full} to a full spool include the {live} shown live"
    );
}
